//! P-521 arithmetic for the Tang recovery exchange (McCallum-Relyea).
//!
//! The server answers `POST /rec` with `Y = S * X`: its exchange private scalar `S` times the point `X` posted
//! by the client. This crate owns that operation and nothing else: it decodes and validates the posted point,
//! multiplies in constant time and returns both affine coordinates as fixed-width big-endian bytes.
//!
//! The arithmetic is AWS-LC's (formally verified s2n-bignum field code, constant-time scalar multiplication),
//! chosen by measurement against OpenSSL and RustCrypto; see `bench/p521-candidates`.
//!
//! Secrets never leave this crate: an [`ExchangeKey`] is built once from the private scalar bytes, keeps the
//! scalar inside AWS-LC (whose allocator wipes memory when it is freed; the temporary `BIGNUM` is cleared too)
//! and has no accessor or `Debug` output for it.

mod aws;
mod exchange;

pub use exchange::ExchangeKey;

/// `P + Q` for two validated points: the client side of the exchange (clevis blinds its point as `X = C + E`
/// and unblinds the answer as `K = Y - e*S`). Public values only.
pub fn add_points(
    p: (&Coordinate, &Coordinate),
    q: (&Coordinate, &Coordinate),
) -> Result<(Coordinate, Coordinate), Error> {
    let (p, q) = (
        aws::Point::from_affine(p.0, p.1)?,
        aws::Point::from_affine(q.0, q.1)?,
    );
    p.add(&q)?.to_affine()
}

/// Width of one P-521 coordinate or scalar in bytes (521 bits, rounded up).
pub const COORDINATE_LEN: usize = 66;

/// One affine coordinate, big-endian, left-padded with zeros.
pub type Coordinate = [u8; COORDINATE_LEN];

/// Why a point or a key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// A coordinate is not below the field prime p = 2^521 - 1.
    CoordinateOutOfRange,
    /// The coordinates do not satisfy the curve equation (this includes the point at infinity, which has no
    /// affine coordinates).
    NotOnCurve,
    /// The private scalar is zero or not below the group order.
    InvalidScalar,
    /// The private scalar does not belong to the given public point.
    KeyMismatch,
    /// The multiplication produced the point at infinity (impossible for a valid key and point; kept as a guard).
    PointAtInfinity,
    /// AWS-LC failed for a reason that is not the caller's input (allocation).
    Internal,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Error::CoordinateOutOfRange => "coordinate is not below the field prime",
            Error::NotOnCurve => "point is not on the P-521 curve",
            Error::InvalidScalar => "private scalar is zero or not below the group order",
            Error::KeyMismatch => "private scalar does not match the public point",
            Error::PointAtInfinity => "result is the point at infinity",
            Error::Internal => "internal error in the P-521 arithmetic",
        })
    }
}

impl std::error::Error for Error {}

/// True when the big-endian `value` is at least the field prime p = 2^521 - 1 (0x01 followed by 65 0xff bytes).
///
/// Public data only, so this need not be constant-time.
pub fn is_at_least_field_prime(value: &Coordinate) -> bool {
    match value[0] {
        0 => false,
        1 => value[1..].iter().all(|&b| b == 0xff),
        _ => true,
    }
}
