//! The compressed forms of a cached body. Each is made at most once per cache fill, by the first
//! response that asks for it, and kept with the entry: every later hit sends the kept bytes, so a
//! compressed hit costs what an uncompressed one does. Bodies under `MIN_BYTES`, and bodies that
//! would not shrink, are sent as they are.

use std::io::Write;
use std::sync::OnceLock;

use actix_web::http::header::HeaderValue;
use bytes::Bytes;

/// Below this a body fits in a packet or two either way; compressing it saves nothing worth a
/// `Content-Encoding` (nginx's and CDNs' defaults sit near it).
pub const MIN_BYTES: usize = 1024;

/// Brotli quality 5 of 11: within a few per cent of the best ratio on JSON at a fraction of the
/// time (the first compressed response after a fill pays it).
const BROTLI_QUALITY: u32 = 5;
/// Brotli's window (log2 bytes): 4 MiB, far past any page the API serves.
const BROTLI_WINDOW: u32 = 22;

/// A content coding the cached reads offer (`Accept-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Brotli,
}

impl Coding {
    /// The `Content-Encoding` value, and the suffix that makes a form's ETag its own.
    pub fn token(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip => "gzip",
            Self::Brotli => "br",
        }
    }
}

/// A compressed body and its ETag (`"<identity tag>-gzip"`: a strong validator per form, RFC 9110
/// §8.8.3, so a client revalidates the form it holds).
#[derive(Debug)]
pub struct Form {
    pub bytes: Bytes,
    pub etag: HeaderValue,
}

/// The forms of one body; `None` inside a cell: not worth compressing.
#[derive(Debug, Default)]
pub struct Compressed {
    gzip: OnceLock<Option<Form>>,
    brotli: OnceLock<Option<Form>>,
}

impl Compressed {
    /// `body` in `coding`, made on the first call (which runs `made` once it has compressed);
    /// `None` for identity, a small body, or one that does not shrink.
    pub fn form(&self, coding: Coding, body: &Bytes, etag: &HeaderValue, made: impl FnOnce()) -> Option<&Form> {
        let cell = match coding {
            Coding::Identity => return None,
            _ if body.len() < MIN_BYTES => return None,
            Coding::Gzip => &self.gzip,
            Coding::Brotli => &self.brotli,
        };
        cell.get_or_init(|| {
            let bytes = compress(coding, body);
            made();
            (bytes.len() < body.len()).then(|| Form {
                etag: tagged(etag, coding),
                bytes,
            })
        })
        .as_ref()
    }
}

fn compress(coding: Coding, body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() / 4);
    match coding {
        Coding::Gzip => {
            let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::default());
            encoder.write_all(body).expect("writing to memory");
            out = encoder.finish().expect("writing to memory");
        }
        Coding::Brotli => {
            let mut encoder = brotli::CompressorWriter::new(&mut out, 4096, BROTLI_QUALITY, BROTLI_WINDOW);
            encoder.write_all(body).expect("writing to memory");
            drop(encoder);
        }
        Coding::Identity => out.extend_from_slice(body),
    }
    Bytes::from(out)
}

/// `"abc"` → `"abc-gzip"`.
fn tagged(etag: &HeaderValue, coding: Coding) -> HeaderValue {
    let quoted = etag.as_bytes();
    let inner = quoted.strip_suffix(b"\"").unwrap_or(quoted);
    let mut tag = Vec::with_capacity(quoted.len() + 6);
    tag.extend_from_slice(inner);
    tag.push(b'-');
    tag.extend_from_slice(coding.token().as_bytes());
    tag.push(b'"');
    HeaderValue::from_bytes(&tag).expect("an ETag with an ASCII suffix is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(len: usize) -> Bytes {
        let item = r#"{"id":"6f1c","title":"Write the release notes","status":"todo"},"#;
        Bytes::from(format!("[{}]", item.repeat(len / item.len() + 1)))
    }

    #[test]
    fn each_form_is_made_once_and_decodes_to_the_body() {
        let body = json(8192);
        let etag = HeaderValue::from_static("\"0123456789abcdef\"");
        let forms = Compressed::default();
        let mut made = 0;
        for _ in 0..3 {
            let gzip = forms
                .form(Coding::Gzip, &body, &etag, || made += 1)
                .expect("8 KB shrinks");
            let mut decoded = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gzip.bytes[..]), &mut decoded).unwrap();
            assert_eq!(decoded, body);
            assert_eq!(gzip.etag, "\"0123456789abcdef-gzip\"");
        }
        let brotli = forms
            .form(Coding::Brotli, &body, &etag, || made += 1)
            .expect("8 KB shrinks");
        let mut decoded = Vec::new();
        brotli::BrotliDecompress(&mut &brotli.bytes[..], &mut decoded).unwrap();
        assert_eq!(decoded, body);
        assert_eq!(brotli.etag, "\"0123456789abcdef-br\"");
        assert_eq!(made, 2, "one compression per form");
    }

    #[test]
    fn small_bodies_and_identity_are_sent_as_they_are() {
        let etag = HeaderValue::from_static("\"0123456789abcdef\"");
        let forms = Compressed::default();
        let never = || panic!("nothing to compress");
        assert!(forms.form(Coding::Gzip, &json(100), &etag, never).is_none());
        assert!(forms.form(Coding::Identity, &json(8192), &etag, never).is_none());
    }
}
