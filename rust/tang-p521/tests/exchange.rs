//! The engine checked against an independent implementation (RustCrypto `p521`) and against the inputs it
//! must refuse.
use p521::elliptic_curve::sec1::ToEncodedPoint;
use p521::elliptic_curve::PrimeField;
use p521::{ProjectivePoint, Scalar};
use tang_p521::{is_at_least_field_prime, Coordinate, Error, ExchangeKey};

include!("support/vectors.rs");

fn affine(point: ProjectivePoint) -> (Coordinate, Coordinate) {
    let encoded = point.to_affine().to_encoded_point(false);
    (
        encoded.x().unwrap()[..].try_into().unwrap(),
        encoded.y().unwrap()[..].try_into().unwrap(),
    )
}

fn scalar_bytes(s: &Scalar) -> Coordinate {
    s.to_repr()[..].try_into().unwrap()
}

/// A deterministic generator of scalars, so failures reproduce.
fn scalars(count: usize) -> impl Iterator<Item = Scalar> {
    let mut state = Scalar::from_u64(0x5eed);
    (0..count).map(move |i| {
        state = state.square() + Scalar::from_u64(i as u64 + 7);
        state
    })
}

const P: Coordinate = {
    let mut p = [0xffu8; 66];
    p[0] = 0x01;
    p
};

#[test]
fn exchange_matches_independent_implementation() {
    for (s, c) in scalars(40).zip(scalars(41).skip(1)) {
        let (sx, sy) = affine(ProjectivePoint::GENERATOR * s);
        let key = ExchangeKey::new(&scalar_bytes(&s), &sx, &sy).unwrap();
        let client = ProjectivePoint::GENERATOR * c;
        let (cx, cy) = affine(client);
        assert_eq!(key.exchange(&cx, &cy).unwrap(), affine(client * s));
    }
}

#[test]
fn exchange_with_generator_gives_public_key() {
    let key = ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).unwrap();
    let (gx, gy) = affine(ProjectivePoint::GENERATOR);
    assert_eq!(key.exchange(&gx, &gy).unwrap(), (KEY_X, KEY_Y));
}

#[test]
fn small_scalar_is_accepted() {
    let one = scalar_bytes(&Scalar::ONE);
    let (gx, gy) = affine(ProjectivePoint::GENERATOR);
    let key = ExchangeKey::new(&one, &gx, &gy).unwrap();
    assert_eq!(key.exchange(&KEY_X, &KEY_Y).unwrap(), (KEY_X, KEY_Y));
}

#[test]
fn refuses_coordinates_at_or_above_the_prime() {
    let key = ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).unwrap();
    let mut above = P;
    above[65] = 0xff;
    above[0] = 0x02;
    for bad in [P, above, [0xff; 66]] {
        assert!(is_at_least_field_prime(&bad));
        assert_eq!(
            key.exchange(&bad, &KEY_Y).unwrap_err(),
            Error::CoordinateOutOfRange
        );
        assert_eq!(
            key.exchange(&KEY_X, &bad).unwrap_err(),
            Error::CoordinateOutOfRange
        );
    }
    let mut below = P;
    below[65] = 0xfe;
    assert!(!is_at_least_field_prime(&below));
}

#[test]
fn refuses_points_off_the_curve_and_infinity() {
    let key = ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).unwrap();
    let mut y = KEY_Y;
    y[65] ^= 1;
    assert_eq!(key.exchange(&KEY_X, &y).unwrap_err(), Error::NotOnCurve);
    // The point at infinity has no affine form; its usual encodings (0, 0) and (0, 1) are off the curve.
    let zero = [0u8; 66];
    let mut one = [0u8; 66];
    one[65] = 1;
    assert_eq!(key.exchange(&zero, &zero).unwrap_err(), Error::NotOnCurve);
    assert_eq!(key.exchange(&zero, &one).unwrap_err(), Error::NotOnCurve);
    // Nor is it accepted anywhere else a point enters: as a key's public point, or as either term of a sum.
    let (gx, gy) = affine(ProjectivePoint::GENERATOR);
    for infinity in [(&zero, &zero), (&zero, &one)] {
        assert_eq!(
            ExchangeKey::new(&KEY_D, infinity.0, infinity.1).unwrap_err(),
            Error::NotOnCurve
        );
        assert_eq!(
            tang_p521::add_points(infinity, (&gx, &gy)).unwrap_err(),
            Error::NotOnCurve
        );
        assert_eq!(
            tang_p521::add_points((&gx, &gy), infinity).unwrap_err(),
            Error::NotOnCurve
        );
    }
}

#[test]
fn refuses_invalid_scalars_and_mismatched_keys() {
    let zero = [0u8; 66];
    assert_eq!(
        ExchangeKey::new(&zero, &KEY_X, &KEY_Y).unwrap_err(),
        Error::InvalidScalar
    );
    let order_minus_one = scalar_bytes(&(-Scalar::ONE));
    let mut order = order_minus_one;
    order[65] += 1; // n - 1 ends in ...08, so n = ...09 without carry.
    assert_eq!(
        ExchangeKey::new(&order, &KEY_X, &KEY_Y).unwrap_err(),
        Error::InvalidScalar
    );
    assert_eq!(
        ExchangeKey::new(&[0xff; 66], &KEY_X, &KEY_Y).unwrap_err(),
        Error::InvalidScalar
    );
    let mut other = KEY_D;
    other[65] ^= 1;
    assert_eq!(
        ExchangeKey::new(&other, &KEY_X, &KEY_Y).unwrap_err(),
        Error::KeyMismatch
    );
    let (gx, gy) = affine(ProjectivePoint::GENERATOR);
    assert_eq!(
        ExchangeKey::new(&KEY_D, &gx, &gy).unwrap_err(),
        Error::KeyMismatch
    );
}

#[test]
fn debug_shows_no_secret() {
    let key = ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).unwrap();
    assert_eq!(format!("{key:?}"), "ExchangeKey(P-521)");
}

#[test]
fn shared_across_threads() {
    let key = std::sync::Arc::new(ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).unwrap());
    let (gx, gy) = affine(ProjectivePoint::GENERATOR);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let key = key.clone();
            std::thread::spawn(move || {
                (0..20).all(|_| key.exchange(&gx, &gy).unwrap() == (KEY_X, KEY_Y))
            })
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
}

#[test]
fn addition_matches_independent_implementation() {
    for (a, b) in scalars(20).zip(scalars(21).skip(1)) {
        let (pa, pb) = (
            ProjectivePoint::GENERATOR * a,
            ProjectivePoint::GENERATOR * b,
        );
        let ((ax, ay), (bx, by)) = (affine(pa), affine(pb));
        assert_eq!(
            tang_p521::add_points((&ax, &ay), (&bx, &by)).unwrap(),
            affine(pa + pb)
        );
    }
    let (gx, gy) = affine(ProjectivePoint::GENERATOR);
    assert_eq!(
        tang_p521::add_points((&gx, &gy), (&gx, &gy)).unwrap(),
        affine(ProjectivePoint::GENERATOR + ProjectivePoint::GENERATOR)
    );
    let (nx, ny) = affine(-ProjectivePoint::GENERATOR);
    assert_eq!(
        tang_p521::add_points((&gx, &gy), (&nx, &ny)).unwrap_err(),
        Error::PointAtInfinity
    );
}
