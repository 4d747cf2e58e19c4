use crate::aws::{EcKey, Point};
use crate::{Coordinate, Error};

/// A Tang exchange (ECMR) private key on P-521.
///
/// Built once per key set from the key file's `d`, `x` and `y`; answers any number of recoveries, from any
/// number of threads at once. The scalar cannot be read back, and `Debug` shows only the curve.
pub struct ExchangeKey {
    key: EcKey,
}

impl ExchangeKey {
    /// Validates the public point, the scalar's range and that the scalar generates the point.
    pub fn new(d: &Coordinate, x: &Coordinate, y: &Coordinate) -> Result<Self, Error> {
        let public = Point::from_affine(x, y)?;
        Ok(Self {
            key: EcKey::from_parts(d, &public)?,
        })
    }

    /// The McCallum-Relyea server step: `Y = S * X` for the client's point `X = (x, y)`.
    ///
    /// `X` is validated first (coordinates below p, on the curve); the multiplication is constant-time in the
    /// scalar. Returns both affine coordinates of `Y`.
    pub fn exchange(
        &self,
        x: &Coordinate,
        y: &Coordinate,
    ) -> Result<(Coordinate, Coordinate), Error> {
        let point = Point::from_affine(x, y)?;
        self.key.multiply(&point)?.to_affine()
    }
}

impl std::fmt::Debug for ExchangeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExchangeKey(P-521)")
    }
}
