//! Variable-base P-521 scalar multiplication (the `/rec` operation, Y = S*X) in each candidate library.
//!
//! Every candidate multiplies the same point by the same secret scalar; the outputs are compared so a fast
//! but wrong candidate cannot win. Rates are single-threaded operations per second.
use std::time::{Duration, Instant};

const SECONDS: f64 = 3.0;

/// A fixed scalar and point (the point is 7*G computed by OpenSSL below); the values do not matter for speed.
const SCALAR: [u8; 66] = {
    let mut s = [0u8; 66];
    let mut i = 1;
    while i < 66 {
        s[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    s
};

fn rate(name: &str, mut op: impl FnMut() -> ([u8; 66], [u8; 66])) -> ([u8; 66], [u8; 66]) {
    let out = op();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(SECONDS) {
        for _ in 0..50 {
            std::hint::black_box(op());
        }
        n += 50;
    }
    let per_sec = n as f64 / start.elapsed().as_secs_f64();
    println!("{name:<24} {per_sec:>10.0} mul/s  {:>7.1} us/mul", 1e6 / per_sec);
    out
}

fn base_point() -> ([u8; 66], [u8; 66]) {
    use openssl::{bn::*, ec::*, nid::Nid};
    let group = EcGroup::from_curve_name(Nid::SECP521R1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let mut p = EcPoint::new(&group).unwrap();
    p.mul_generator2(&group, &BigNum::from_u32(7).unwrap(), &mut ctx).unwrap();
    let (mut x, mut y) = (BigNum::new().unwrap(), BigNum::new().unwrap());
    p.affine_coordinates(&group, &mut x, &mut y, &mut ctx).unwrap();
    (fixed(&x.to_vec_padded(66).unwrap()), fixed(&y.to_vec_padded(66).unwrap()))
}

fn fixed(v: &[u8]) -> [u8; 66] {
    v.try_into().unwrap()
}

fn openssl_crate(px: &[u8; 66], py: &[u8; 66]) -> impl FnMut() -> ([u8; 66], [u8; 66]) {
    use openssl::{bn::*, ec::*, nid::Nid};
    let group = EcGroup::from_curve_name(Nid::SECP521R1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let point = EcPoint::from_bytes(&group, &[&[4u8][..], px, py].concat(), &mut ctx).unwrap();
    let mut scalar = BigNum::from_slice(&SCALAR).unwrap();
    scalar.set_const_time();
    move || {
        let mut r = EcPoint::new(&group).unwrap();
        r.mul2(&group, &point, &scalar, &mut ctx).unwrap();
        let (mut x, mut y) = (BigNum::new().unwrap(), BigNum::new().unwrap());
        r.affine_coordinates(&group, &mut x, &mut y, &mut ctx).unwrap();
        (fixed(&x.to_vec_padded(66).unwrap()), fixed(&y.to_vec_padded(66).unwrap()))
    }
}

fn aws_lc(px: &[u8; 66], py: &[u8; 66]) -> impl FnMut() -> ([u8; 66], [u8; 66]) {
    use aws_lc_sys::*;
    unsafe {
        let group = EC_GROUP_new_by_curve_name(NID_secp521r1);
        let ctx = BN_CTX_new();
        let bx = BN_bin2bn(px.as_ptr(), 66, std::ptr::null_mut());
        let by = BN_bin2bn(py.as_ptr(), 66, std::ptr::null_mut());
        let point = EC_POINT_new(group);
        assert_eq!(EC_POINT_set_affine_coordinates_GFp(group, point, bx, by, ctx), 1);
        let scalar = BN_bin2bn(SCALAR.as_ptr(), 66, std::ptr::null_mut());
        let r = EC_POINT_new(group);
        let (ox, oy) = (BN_new(), BN_new());
        move || {
            assert_eq!(EC_POINT_mul(group, r, std::ptr::null(), point, scalar, ctx), 1);
            assert_eq!(EC_POINT_get_affine_coordinates_GFp(group, r, ox, oy, ctx), 1);
            let (mut x, mut y) = ([0u8; 66], [0u8; 66]);
            assert_eq!(BN_bn2bin_padded(x.as_mut_ptr(), 66, ox), 1);
            assert_eq!(BN_bn2bin_padded(y.as_mut_ptr(), 66, oy), 1);
            (x, y)
        }
    }
}

fn rustcrypto(px: &[u8; 66], py: &[u8; 66]) -> impl FnMut() -> ([u8; 66], [u8; 66]) {
    use p521::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
    use p521::elliptic_curve::PrimeField;
    let encoded = p521::EncodedPoint::from_affine_coordinates(px[..].into(), py[..].into(), false);
    let point = p521::ProjectivePoint::from(p521::AffinePoint::from_encoded_point(&encoded).unwrap());
    let scalar = p521::Scalar::from_repr(*p521::FieldBytes::from_slice(&SCALAR)).unwrap();
    move || {
        let r = (point * scalar).to_affine().to_encoded_point(false);
        (fixed(r.x().unwrap()), fixed(r.y().unwrap()))
    }
}

fn main() {
    let (px, py) = base_point();
    let a = rate("aws-lc-sys (AWS-LC)", aws_lc(&px, &py));
    let b = rate("openssl crate (system)", openssl_crate(&px, &py));
    let c = rate("p521 (RustCrypto)", rustcrypto(&px, &py));
    assert!(a == b && b == c, "candidates disagree");
    println!("all candidates agree on S*X");
}
