//! S3's rule for the ETag of an object completed by a multipart upload: the MD5 of the parts'
//! MD5s, then `-<number of parts>`. The uploader uses it to recognise an upload that completed
//! although the reply was lost.

use super::Part;

/// The ETag S3 gives an object completed from `parts` (empty when a part's ETag is not an MD5,
/// as on some stores).
pub fn multipart_etag(parts: &[Part]) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    for p in parts {
        let Some(bytes) = hex_bytes(&p.etag) else {
            return String::new();
        };
        h.update(bytes);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{}", parts.len())
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.len() != 32 {
        return None;
    }
    (0..16)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_of_a_completed_multipart_object() {
        // Two parts whose ETags are the MD5s of "a" and "b".
        let part = |n, etag: &str| Part {
            number: n,
            etag: etag.to_string(),
        };
        let parts = [
            part(1, "0cc175b9c0f1b6a831c399e269772661"),
            part(2, "92eb5ffee6ae2fec3ad71c777531578f"),
        ];
        // md5(md5("a") ++ md5("b")) as raw bytes, then the part count.
        assert_eq!(multipart_etag(&parts), "96e024ba2074fe77e8e965ba43a704be-2");
        assert_eq!(multipart_etag(&[part(1, "not-an-md5")]), "");
    }
}
