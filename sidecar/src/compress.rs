//! Response compression: `Accept-Encoding` negotiation (q-values, `*`, `identity;q=0`), the
//! rules for what is never compressed, in-memory compression of cached bodies (done once per
//! entry and encoding), and streaming compression of bodies that pass through.

use std::io;

use apipolicy_api::{CompressionConfig, Encoding};
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use bytes::Bytes;
use futures::TryStreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::{BodyExt, StreamBody, combinators::UnsyncBoxBody};
use tokio::io::AsyncReadExt;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::body::BoxError;

/// Levels that keep compression fast enough to sit on the request path.
const GZIP_LEVEL: i32 = 6;
const BROTLI_QUALITY: i32 = 5;
const ZSTD_LEVEL: i32 = 3;

/// The encoding to use for a client: the first of the route's algorithms (server preference)
/// that the client accepts with the highest q-value. `None`: send the body as it is.
pub fn negotiate(accept: Option<&HeaderValue>, offered: &[Encoding]) -> Option<Encoding> {
    negotiate_bytes(accept.map(HeaderValue::as_bytes), offered)
}

/// The same from the value's bytes; a value `HeaderValue::to_str` refuses (not visible ASCII)
/// offers nothing.
pub fn negotiate_bytes(accept: Option<&[u8]>, offered: &[Encoding]) -> Option<Encoding> {
    let accept = accept?;
    if !crate::headers::is_text(accept) {
        return None;
    }
    let accept = std::str::from_utf8(accept).ok()?;
    let mut best: Option<(Encoding, f32)> = None;
    for enc in offered {
        let q = q_value(accept, enc.as_str());
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((*enc, q));
        }
    }
    best.map(|(e, _)| e)
}

/// The q-value the client gives `coding`: its own entry, else `*`, else 0.
fn q_value(accept: &str, coding: &str) -> f32 {
    let mut star = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
            .find_map(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0)
            .clamp(0.0, 1.0);
        if name.eq_ignore_ascii_case(coding) {
            return q;
        }
        if name == "*" {
            star = Some(q);
        }
    }
    star.unwrap_or(0.0)
}

/// Whether a response may be compressed under `config`: not already encoded, not partial,
/// no `no-transform`, a listed media type, at least `minSize` bytes when the size is known.
pub fn compressible(status: StatusCode, headers: &HeaderMap, config: &CompressionConfig) -> bool {
    if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED | StatusCode::PARTIAL_CONTENT)
        || status.is_informational()
        || headers.contains_key(header::CONTENT_ENCODING)
        || headers.contains_key(header::CONTENT_RANGE)
    {
        return false;
    }
    let no_transform = headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.as_bytes().split(|&c| c == b',').any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
    });
    if no_transform {
        return false;
    }
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let media = ct.split(';').next().unwrap_or("").trim();
    if !config.content_types.iter().any(|pattern| media_matches(pattern, media)) {
        return false;
    }
    match headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(len) => len >= config.min_size,
        None => true,
    }
}

/// `text/*`, `application/*+json` and exact types, case-insensitively (on every compressed
/// response and cache hit: bytes compared in place, no allocation).
fn media_matches(pattern: &str, media: &str) -> bool {
    let (p, m) = (pattern.as_bytes(), media.as_bytes());
    let slash = |b: &[u8]| b.iter().position(|&c| c == b'/');
    let (Some(pi), Some(mi)) = (slash(p), slash(m)) else { return false };
    let (pt, ps, mt, ms) = (&p[..pi], &p[pi + 1..], &m[..mi], &m[mi + 1..]);
    if pt != b"*" && !pt.eq_ignore_ascii_case(mt) {
        return false;
    }
    if ps == b"*" {
        return true;
    }
    match ps.strip_prefix(b"*+") {
        Some(suffix) => {
            ms.len() > suffix.len()
                && ms[ms.len() - suffix.len() - 1] == b'+'
                && ms[ms.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
        None => ps.eq_ignore_ascii_case(ms),
    }
}

/// Compresses a whole body in memory.
pub async fn compress_bytes(encoding: Encoding, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() / 3 + 64);
    match encoding {
        Encoding::Gzip => GzipEncoder::with_quality(body, level(encoding)).read_to_end(&mut out).await?,
        Encoding::Br => BrotliEncoder::with_quality(body, level(encoding)).read_to_end(&mut out).await?,
        Encoding::Zstd => ZstdEncoder::with_quality(body, level(encoding)).read_to_end(&mut out).await?,
    };
    Ok(out)
}

fn level(encoding: Encoding) -> async_compression::Level {
    async_compression::Level::Precise(match encoding {
        Encoding::Gzip => GZIP_LEVEL,
        Encoding::Br => BROTLI_QUALITY,
        Encoding::Zstd => ZSTD_LEVEL,
    })
}

pub type Streamed = UnsyncBoxBody<Bytes, BoxError>;

/// Compresses a body as it streams through.
pub fn compress_stream<B>(encoding: Encoding, body: B) -> Streamed
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let frames = body.into_data_stream().map_err(|e| io::Error::other(e.into()));
    let reader = StreamReader::new(frames);
    let stream = match encoding {
        Encoding::Gzip => {
            ReaderStream::new(GzipEncoder::with_quality(reader, level(encoding))).boxed_stream()
        }
        Encoding::Br => {
            ReaderStream::new(BrotliEncoder::with_quality(reader, level(encoding))).boxed_stream()
        }
        Encoding::Zstd => {
            ReaderStream::new(ZstdEncoder::with_quality(reader, level(encoding))).boxed_stream()
        }
    };
    StreamBody::new(stream.map_ok(http_body::Frame::data).map_err(|e| Box::new(e) as BoxError)).boxed_unsync()
}

trait BoxedStream {
    fn boxed_stream(self) -> futures::stream::BoxStream<'static, io::Result<Bytes>>;
}

impl<S> BoxedStream for S
where
    S: futures::Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    fn boxed_stream(self) -> futures::stream::BoxStream<'static, io::Result<Bytes>> {
        Box::pin(self)
    }
}

/// Appends `value` to the `Vary` header unless it is there already.
pub fn add_vary(headers: &mut HeaderMap, value: &str) {
    let present = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(value) || v.trim() == "*");
    if !present && let Ok(v) = HeaderValue::from_str(value) {
        headers.append(header::VARY, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Encoding; 3] = [Encoding::Br, Encoding::Zstd, Encoding::Gzip];

    fn neg(accept: &str) -> Option<Encoding> {
        negotiate(Some(&HeaderValue::from_str(accept).unwrap()), &ALL)
    }

    #[test]
    fn negotiation_follows_q_values_and_server_preference() {
        assert_eq!(neg("gzip, deflate, br"), Some(Encoding::Br), "server preference among equals");
        assert_eq!(neg("gzip;q=1.0, br;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(neg("br;q=0, gzip"), Some(Encoding::Gzip));
        assert_eq!(neg("*"), Some(Encoding::Br));
        assert_eq!(neg("*;q=0.5, br;q=0"), Some(Encoding::Zstd));
        assert_eq!(neg("gzip;q=0, *;q=0"), None);
        assert_eq!(neg("identity"), None);
        assert_eq!(neg("identity;q=0"), None, "nothing offered is acceptable: identity anyway");
        assert_eq!(neg("deflate"), None);
        assert_eq!(neg("GZIP"), Some(Encoding::Gzip));
        assert_eq!(negotiate(None, &ALL), None);
        assert_eq!(negotiate(Some(&HeaderValue::from_static("gzip")), &[Encoding::Br]), None);
    }

    #[test]
    fn what_is_never_compressed() {
        let config = CompressionConfig {
            algorithms: ALL.to_vec(),
            min_size: 100,
            content_types: vec!["text/*".into(), "application/json".into(), "application/*+json".into()],
        };
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            m
        };
        let ok = StatusCode::OK;
        assert!(compressible(ok, &h(&[("content-type", "application/json; charset=utf-8")]), &config));
        assert!(compressible(ok, &h(&[("content-type", "application/problem+json")]), &config));
        assert!(compressible(ok, &h(&[("content-type", "Application/Problem+JSON")]), &config));
        assert!(compressible(ok, &h(&[("content-type", "TEXT/plain")]), &config));
        assert!(!compressible(ok, &h(&[("content-type", "application/json5")]), &config));
        assert!(!compressible(ok, &h(&[("content-type", "application/xjson")]), &config));
        assert!(compressible(ok, &h(&[("content-type", "text/html"), ("content-length", "100")]), &config));
        assert!(!compressible(ok, &h(&[("content-type", "text/html"), ("content-length", "99")]), &config));
        assert!(!compressible(ok, &h(&[("content-type", "image/png")]), &config));
        assert!(!compressible(
            ok,
            &h(&[("content-type", "text/html"), ("content-encoding", "gzip")]),
            &config
        ));
        assert!(!compressible(
            ok,
            &h(&[("content-type", "text/html"), ("cache-control", "public, no-transform")]),
            &config
        ));
        assert!(!compressible(StatusCode::PARTIAL_CONTENT, &h(&[("content-type", "text/html")]), &config));
        assert!(!compressible(ok, &h(&[]), &config), "no content type: unknown, left alone");
    }

    #[tokio::test]
    async fn compressed_bodies_decompress_to_the_original() {
        let body = "{\"items\": [".to_owned() + &"{\"name\": \"product\"},".repeat(500) + "{}]}";
        for enc in ALL {
            let packed = compress_bytes(enc, body.as_bytes()).await.unwrap();
            assert!(packed.len() < body.len() / 5, "{enc:?}: {} of {}", packed.len(), body.len());
            let mut plain = Vec::new();
            match enc {
                Encoding::Gzip => {
                    async_compression::tokio::bufread::GzipDecoder::new(&packed[..])
                        .read_to_end(&mut plain)
                        .await
                }
                Encoding::Br => {
                    async_compression::tokio::bufread::BrotliDecoder::new(&packed[..])
                        .read_to_end(&mut plain)
                        .await
                }
                Encoding::Zstd => {
                    async_compression::tokio::bufread::ZstdDecoder::new(&packed[..])
                        .read_to_end(&mut plain)
                        .await
                }
            }
            .unwrap();
            assert_eq!(plain, body.as_bytes());
        }
    }
}
