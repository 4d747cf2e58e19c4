//! Differential fuzzing of the exchange API against RustCrypto's `p521`.
//!
//! Every input must give the oracle's answer: a point is accepted exactly when the oracle decodes it, a key
//! exactly when `d * G` is its public point, and every product and sum equals the oracle's. Nothing may panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use p521::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use p521::elliptic_curve::PrimeField;
use p521::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar};
use tang_p521::{add_points, Coordinate, Error, ExchangeKey};

include!("../../tests/support/vectors.rs");

#[derive(Arbitrary, Debug)]
enum Input {
    /// Arbitrary coordinates sent to a fixed key (almost always refused: they must be refused for the right reason).
    Coordinates { x: Coordinate, y: Coordinate },
    /// A point decompressed from an arbitrary x (valid half the time), sent to a fixed key.
    OnCurve { x: Coordinate, odd: bool },
    /// A key built from an arbitrary scalar, exchanging an arbitrary valid point.
    Key {
        d: Coordinate,
        x: Coordinate,
        odd: bool,
    },
    /// Arbitrary key parts: accepted exactly when they form a key pair.
    Parts {
        d: Coordinate,
        x: Coordinate,
        y: Coordinate,
    },
    /// The client-side sum of two points, each decompressed from an arbitrary x.
    Sum {
        a: Coordinate,
        a_odd: bool,
        b: Coordinate,
        b_odd: bool,
    },
}

fn field_bytes(value: &Coordinate) -> FieldBytes {
    let mut bytes = FieldBytes::default();
    bytes.copy_from_slice(value);
    bytes
}

fn oracle_point(x: &Coordinate, y: &Coordinate) -> Option<AffinePoint> {
    let encoded = EncodedPoint::from_affine_coordinates(&field_bytes(x), &field_bytes(y), false);
    AffinePoint::from_encoded_point(&encoded).into()
}

fn decompressed(x: &Coordinate, odd: bool) -> Option<AffinePoint> {
    let mut bytes = [0u8; 67];
    bytes[0] = if odd { 3 } else { 2 };
    bytes[1..].copy_from_slice(x);
    let encoded = EncodedPoint::from_bytes(bytes).ok()?;
    AffinePoint::from_encoded_point(&encoded).into()
}

fn coordinates(point: &AffinePoint) -> Option<(Coordinate, Coordinate)> {
    let encoded = point.to_encoded_point(false);
    Some((
        encoded.x()?[..].try_into().ok()?,
        encoded.y()?[..].try_into().ok()?,
    ))
}

fn oracle_scalar(d: &Coordinate) -> Option<Scalar> {
    Option::<Scalar>::from(Scalar::from_repr(field_bytes(d))).filter(|s| !bool::from(s.is_zero()))
}

/// The fixed key's answer for a point, checked against the oracle's product.
fn check_exchange(key: &ExchangeKey, scalar: &Scalar, x: &Coordinate, y: &Coordinate) {
    let answer = key.exchange(x, y);
    match oracle_point(x, y) {
        Some(point) => {
            let expected = coordinates(&(ProjectivePoint::from(point) * scalar).to_affine());
            assert_eq!(answer.ok(), expected, "product differs from the oracle's");
        }
        None => assert!(
            matches!(answer, Err(Error::CoordinateOutOfRange | Error::NotOnCurve)),
            "invalid point not refused as such: {answer:?}"
        ),
    }
}

fuzz_target!(|input: Input| {
    let fixed_scalar = oracle_scalar(&KEY_D).expect("the test key's scalar is valid");
    let fixed = ExchangeKey::new(&KEY_D, &KEY_X, &KEY_Y).expect("the test key is valid");
    match input {
        Input::Coordinates { x, y } => check_exchange(&fixed, &fixed_scalar, &x, &y),
        Input::OnCurve { x, odd } => {
            if let Some((x, y)) = decompressed(&x, odd).as_ref().and_then(coordinates) {
                check_exchange(&fixed, &fixed_scalar, &x, &y);
            }
        }
        Input::Key { d, x, odd } => {
            let (Some(scalar), Some(point)) = (oracle_scalar(&d), decompressed(&x, odd)) else {
                return;
            };
            let (public_x, public_y) =
                coordinates(&(ProjectivePoint::GENERATOR * scalar).to_affine()).unwrap();
            let key =
                ExchangeKey::new(&d, &public_x, &public_y).expect("a valid key pair is accepted");
            let (x, y) = coordinates(&point).unwrap();
            check_exchange(&key, &scalar, &x, &y);
        }
        Input::Parts { d, x, y } => {
            let pair =
                oracle_scalar(&d)
                    .zip(oracle_point(&x, &y))
                    .is_some_and(|(scalar, point)| {
                        (ProjectivePoint::GENERATOR * scalar).to_affine() == point
                    });
            assert_eq!(
                ExchangeKey::new(&d, &x, &y).is_ok(),
                pair,
                "key pair acceptance differs from the oracle"
            );
        }
        Input::Sum { a, a_odd, b, b_odd } => {
            let (Some(p), Some(q)) = (decompressed(&a, a_odd), decompressed(&b, b_odd)) else {
                return;
            };
            let (pc, qc) = (coordinates(&p).unwrap(), coordinates(&q).unwrap());
            let expected = coordinates(&(ProjectivePoint::from(p) + q).to_affine());
            let answer = add_points((&pc.0, &pc.1), (&qc.0, &qc.1));
            match expected {
                Some(sum) => assert_eq!(answer.ok(), Some(sum), "sum differs from the oracle's"),
                None => assert_eq!(
                    answer.err(),
                    Some(Error::PointAtInfinity),
                    "P + (-P) is not refused"
                ),
            }
        }
    }
});
