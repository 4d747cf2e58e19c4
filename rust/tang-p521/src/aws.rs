//! Owning wrappers around the few AWS-LC objects the exchange needs, so that every `unsafe` call sits next to
//! the object whose invariant makes it sound, and every allocation is freed (and wiped) exactly once.

use std::ptr::NonNull;

use aws_lc_sys as ffi;

use crate::{Coordinate, Error, COORDINATE_LEN};

/// The P-521 group. AWS-LC returns a static, immutable, thread-safe object for built-in curves.
pub(crate) fn p521() -> *const ffi::EC_GROUP {
    // SAFETY: no preconditions; for a built-in curve the result is a static that is never freed.
    unsafe { ffi::EC_GROUP_new_by_curve_name(ffi::NID_secp521r1) }
}

/// A heap `BIGNUM`, cleared before it is freed (it may hold a secret scalar on its way into an `EC_KEY`).
pub(crate) struct BigNum(NonNull<ffi::BIGNUM>);

impl BigNum {
    pub(crate) fn from_be_bytes(bytes: &[u8]) -> Result<Self, Error> {
        // SAFETY: the pointer and length describe `bytes`; a null `ret` asks AWS-LC to allocate.
        let raw = unsafe { ffi::BN_bin2bn(bytes.as_ptr(), bytes.len(), std::ptr::null_mut()) };
        NonNull::new(raw).map(Self).ok_or(Error::Internal)
    }

    pub(crate) fn new() -> Result<Self, Error> {
        // SAFETY: no preconditions.
        NonNull::new(unsafe { ffi::BN_new() })
            .map(Self)
            .ok_or(Error::Internal)
    }

    pub(crate) fn as_ptr(&self) -> *mut ffi::BIGNUM {
        self.0.as_ptr()
    }

    pub(crate) fn to_coordinate(&self) -> Result<Coordinate, Error> {
        let mut out = [0u8; COORDINATE_LEN];
        // SAFETY: `out` is writable for COORDINATE_LEN bytes; the bignum is valid.
        match unsafe { ffi::BN_bn2bin_padded(out.as_mut_ptr(), out.len(), self.as_ptr()) } {
            1 => Ok(out),
            _ => Err(Error::Internal),
        }
    }
}

impl Drop for BigNum {
    fn drop(&mut self) {
        // SAFETY: we own the bignum and free it once.
        unsafe { ffi::BN_clear_free(self.as_ptr()) }
    }
}

/// A point on P-521.
pub(crate) struct Point(NonNull<ffi::EC_POINT>);

impl Point {
    pub(crate) fn new() -> Result<Self, Error> {
        // SAFETY: the group is valid for the life of the process.
        NonNull::new(unsafe { ffi::EC_POINT_new(p521()) })
            .map(Self)
            .ok_or(Error::Internal)
    }

    /// A validated point from affine coordinates: below p and on the curve (so never the point at infinity).
    pub(crate) fn from_affine(x: &Coordinate, y: &Coordinate) -> Result<Self, Error> {
        if crate::is_at_least_field_prime(x) || crate::is_at_least_field_prime(y) {
            return Err(Error::CoordinateOutOfRange);
        }
        let (bx, by) = (BigNum::from_be_bytes(x)?, BigNum::from_be_bytes(y)?);
        let point = Self::new()?;
        // SAFETY: all pointers are valid; AWS-LC checks the curve equation and fails on a point off the curve.
        let ok = unsafe {
            ffi::EC_POINT_set_affine_coordinates_GFp(
                p521(),
                point.as_ptr(),
                bx.as_ptr(),
                by.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        match ok {
            1 => Ok(point),
            _ => {
                clear_error_queue();
                Err(Error::NotOnCurve)
            }
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut ffi::EC_POINT {
        self.0.as_ptr()
    }

    pub(crate) fn to_affine(&self) -> Result<(Coordinate, Coordinate), Error> {
        // SAFETY: the point is valid.
        if unsafe { ffi::EC_POINT_is_at_infinity(p521(), self.as_ptr()) } == 1 {
            return Err(Error::PointAtInfinity);
        }
        let (x, y) = (BigNum::new()?, BigNum::new()?);
        // SAFETY: all pointers are valid; the point is finite.
        let ok = unsafe {
            ffi::EC_POINT_get_affine_coordinates_GFp(
                p521(),
                self.as_ptr(),
                x.as_ptr(),
                y.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if ok != 1 {
            clear_error_queue();
            return Err(Error::Internal);
        }
        Ok((x.to_coordinate()?, y.to_coordinate()?))
    }
}

impl Point {
    /// `self + other`.
    pub(crate) fn add(&self, other: &Point) -> Result<Point, Error> {
        let result = Point::new()?;
        // SAFETY: all pointers are valid points on the same group; a null context is allowed.
        let ok = unsafe {
            ffi::EC_POINT_add(
                p521(),
                result.as_ptr(),
                self.as_ptr(),
                other.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        if ok != 1 {
            clear_error_queue();
            return Err(Error::Internal);
        }
        Ok(result)
    }
}

impl Drop for Point {
    fn drop(&mut self) {
        // SAFETY: we own the point and free it once; the clearing variant because results derive from secrets.
        unsafe { ffi::EC_POINT_clear_free(self.as_ptr()) }
    }
}

/// An `EC_KEY` on P-521 holding a private scalar. AWS-LC wipes the scalar when the key is freed.
pub(crate) struct EcKey(NonNull<ffi::EC_KEY>);

// SAFETY: after construction the key is only read (`EC_KEY_get0_private_key` and multiplications that take it
// as a const input); AWS-LC documents `EC_KEY` as safe for concurrent use in that case.
unsafe impl Send for EcKey {}
// SAFETY: as above, shared references only ever read the key.
unsafe impl Sync for EcKey {}

impl EcKey {
    /// A key from its private scalar and public point; refuses a scalar outside [1, n) or one that does not
    /// generate the given public point.
    pub(crate) fn from_parts(d: &Coordinate, public: &Point) -> Result<Self, Error> {
        // SAFETY: no preconditions.
        let key = NonNull::new(unsafe { ffi::EC_KEY_new_by_curve_name(ffi::NID_secp521r1) })
            .map(Self)
            .ok_or(Error::Internal)?;
        let scalar = BigNum::from_be_bytes(d)?;
        // SAFETY: key and scalar are valid; AWS-LC copies the scalar (our copy is cleared on drop) and refuses
        // zero or values not below the order.
        if unsafe { ffi::EC_KEY_set_private_key(key.as_ptr(), scalar.as_ptr()) } != 1 {
            clear_error_queue();
            return Err(Error::InvalidScalar);
        }
        // SAFETY: key and point are valid; the point is copied.
        if unsafe { ffi::EC_KEY_set_public_key(key.as_ptr(), public.as_ptr()) } != 1 {
            clear_error_queue();
            return Err(Error::Internal);
        }
        // SAFETY: the key is valid; this recomputes d*G and compares it with the public point.
        if unsafe { ffi::EC_KEY_check_key(key.as_ptr()) } != 1 {
            clear_error_queue();
            return Err(Error::KeyMismatch);
        }
        Ok(key)
    }

    fn as_ptr(&self) -> *mut ffi::EC_KEY {
        self.0.as_ptr()
    }

    /// `self.d * point`, in constant time with respect to the scalar.
    pub(crate) fn multiply(&self, point: &Point) -> Result<Point, Error> {
        let result = Point::new()?;
        // SAFETY: all pointers are valid; the private key was set in `from_parts`; a null context is allowed.
        let ok = unsafe {
            ffi::EC_POINT_mul(
                p521(),
                result.as_ptr(),
                std::ptr::null(),
                point.as_ptr(),
                ffi::EC_KEY_get0_private_key(self.as_ptr()),
                std::ptr::null_mut(),
            )
        };
        if ok != 1 {
            clear_error_queue();
            return Err(Error::Internal);
        }
        Ok(result)
    }
}

impl Drop for EcKey {
    fn drop(&mut self) {
        // SAFETY: we own the key and free it once.
        unsafe { ffi::EC_KEY_free(self.as_ptr()) }
    }
}

/// AWS-LC queues an error per failure on a thread-local stack; we report errors through `Error` instead, so drop
/// them to keep the queue from growing on a long-lived worker thread.
fn clear_error_queue() {
    // SAFETY: no preconditions.
    unsafe { ffi::ERR_clear_error() }
}
