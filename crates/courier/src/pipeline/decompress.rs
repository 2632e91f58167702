//! Transparent decompression of values marked `content-encoding: lz4` (SPEC R6).

use std::task::{Context, Poll};

use courier_core::{BoxError, Delivery};
use futures::future::{ready, Either, Ready};
use tower::{Layer, Service};

use super::retry::Permanent;
use crate::compress::{decompress, HEADER_CONTENT_ENCODING};

/// Adds [`DecompressService`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DecompressLayer;

impl<S> Layer<S> for DecompressLayer {
    type Service = DecompressService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DecompressService { inner }
    }
}

/// Gives the handler the value as produced. A value that does not decode fails with
/// [`Permanent`] (no retries: it goes to the dead-letter topic with its bytes intact).
#[derive(Clone)]
pub struct DecompressService<S> {
    inner: S,
}

impl<S> Service<Delivery> for DecompressService<S>
where
    S: Service<Delivery, Response = (), Error = BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Ready<Result<(), BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut d: Delivery) -> Self::Future {
        if let Err(e) = decompress_in_place(&mut d) {
            return Either::Left(ready(Err(Box::new(e) as BoxError)));
        }
        Either::Right(self.inner.call(d))
    }
}

/// Replaces an lz4 value marked `content-encoding: lz4` by what was produced (and
/// drops the marker); a value that does not decode is a [`Permanent`] error.
pub(crate) fn decompress_in_place(d: &mut Delivery) -> Result<(), Permanent> {
    if d.headers.is_empty() {
        return Ok(());
    }
    match decompress(&d.value, &d.headers) {
        Ok(None) => Ok(()),
        Ok(Some(v)) => {
            d.value = v;
            d.headers.remove(HEADER_CONTENT_ENCODING);
            Ok(())
        }
        Err(e) => Err(Permanent::new(e)),
    }
}
