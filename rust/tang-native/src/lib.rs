//! `tang_server._native`: the Python face of the `tang-p521` engine.
//!
//! Deliberately narrow: fixed-width `bytes` go in and come out, the private scalar goes in once and stays in
//! Rust, and every engine error becomes one of the exceptions defined in `tang_server.errors`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tang_p521::{Coordinate, Error, COORDINATE_LEN};
use zeroize::Zeroizing;

pyo3::import_exception!(tang_server.errors, InvalidPoint);
pyo3::import_exception!(tang_server.errors, InvalidKey);

fn to_py_err(error: Error) -> PyErr {
    match error {
        Error::CoordinateOutOfRange | Error::NotOnCurve | Error::PointAtInfinity => {
            InvalidPoint::new_err(error.to_string())
        }
        Error::InvalidScalar | Error::KeyMismatch => InvalidKey::new_err(error.to_string()),
        Error::Internal => pyo3::exceptions::PyRuntimeError::new_err(error.to_string()),
    }
}

fn coordinate(name: &str, value: &[u8]) -> PyResult<Coordinate> {
    value.try_into().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be exactly {COORDINATE_LEN} bytes, got {}",
            value.len()
        ))
    })
}

/// A P-521 exchange (ECMR) private key. The scalar cannot be read back.
#[pyclass(frozen, module = "tang_server._native")]
struct ExchangeKey {
    inner: tang_p521::ExchangeKey,
}

#[pymethods]
impl ExchangeKey {
    #[new]
    fn new(d: &[u8], x: &[u8], y: &[u8]) -> PyResult<Self> {
        // Our copy of the scalar is wiped when it goes out of scope; AWS-LC wipes its own when the key is freed.
        let scalar = Zeroizing::new(coordinate("d", d)?);
        let inner =
            tang_p521::ExchangeKey::new(&scalar, &coordinate("x", x)?, &coordinate("y", y)?)
                .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// `S * X` for the client's point `X = (x, y)`; returns the result's affine `(x, y)`, 66 bytes each.
    fn exchange<'py>(
        &self,
        py: Python<'py>,
        x: &[u8],
        y: &[u8],
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let (x, y) = (coordinate("x", x)?, coordinate("y", y)?);
        // The multiplication is the whole cost of a recovery: let other threads run meanwhile.
        let (rx, ry) = py
            .detach(|| self.inner.exchange(&x, &y))
            .map_err(to_py_err)?;
        Ok((PyBytes::new(py, &rx), PyBytes::new(py, &ry)))
    }

    fn __repr__(&self) -> &'static str {
        "<ExchangeKey P-521>"
    }
}

/// `P + Q` for two points given as affine coordinates (public values: the client side of the exchange).
#[pyfunction]
fn add_points<'py>(
    py: Python<'py>,
    x1: &[u8],
    y1: &[u8],
    x2: &[u8],
    y2: &[u8],
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let p = (coordinate("x1", x1)?, coordinate("y1", y1)?);
    let q = (coordinate("x2", x2)?, coordinate("y2", y2)?);
    let (x, y) = tang_p521::add_points((&p.0, &p.1), (&q.0, &q.1)).map_err(to_py_err)?;
    Ok((PyBytes::new(py, &x), PyBytes::new(py, &y)))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ExchangeKey>()?;
    m.add_function(wrap_pyfunction!(add_points, m)?)?;
    m.add("COORDINATE_LEN", COORDINATE_LEN)?;
    m.add("ENGINE", "aws-lc")?;
    Ok(())
}
