//! Header values made on the request path without a heap allocation each: the text is built
//! on the stack ([`Text`]) and its bytes are cut from a per-thread block ([`cut`]), so a
//! value costs one allocation per few hundred values, and its clones are a refcount.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;

/// Bytes per block: a value shares its block until every value cut from it is gone.
const BLOCK: usize = 4096;

thread_local! {
    static BLOCKS: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value with these bytes, `None` if they are not a valid value (as
/// `HeaderValue::from_bytes` judges).
pub fn cut(bytes: &[u8]) -> Option<HeaderValue> {
    cut_all([bytes]).map(|[v]| v)
}

/// Several header values at once (one look at the block), `None` if one is not valid.
pub fn cut_all<const N: usize>(parts: [&[u8]; N]) -> Option<[HeaderValue; N]> {
    BLOCKS.with_borrow_mut(|block| {
        let total = parts.iter().map(|p| p.len()).sum::<usize>();
        if block.capacity() < total {
            *block = BytesMut::with_capacity(BLOCK.max(total));
        }
        let mut valid = true;
        let values = std::array::from_fn(|i| {
            block.extend_from_slice(parts[i]);
            HeaderValue::from_maybe_shared(block.split().freeze()).unwrap_or_else(|_| {
                valid = false;
                HeaderValue::from_static("")
            })
        });
        valid.then_some(values)
    })
}

/// A short text on the stack. What does not fit is cut off and [`Text::fits`] says so.
pub struct Text {
    buf: [u8; 128],
    len: usize,
    overflow: bool,
}

impl Default for Text {
    fn default() -> Self {
        Self { buf: [0; 128], len: 0, overflow: false }
    }
}

impl Text {
    pub fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self.overflow |= n < bytes.len();
        self
    }

    /// `n` in decimal, two digits a step, without `core::fmt`.
    pub fn push_u64(&mut self, mut n: u64) -> &mut Self {
        const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
            2021222324252627282930313233343536373839\
            4041424344454647484950515253545556575859\
            6061626364656667686970717273747576777879\
            8081828384858687888990919293949596979899";
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[n as usize * 2..n as usize * 2 + 2]);
        } else {
            i -= 1;
            digits[i] = b'0' + n as u8;
        }
        self.push(&digits[i..])
    }

    pub fn fits(&self) -> bool {
        !self.overflow
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_texts() {
        let number = |n: u64| cut(Text::default().push_u64(n).as_bytes()).unwrap();
        for n in [0, 7, 10, 99, 100, 12345, u64::MAX] {
            assert_eq!(number(n), n.to_string().as_str());
        }
        let mut t = Text::default();
        t.push(b"\"api\";r=").push_u64(42).push(b";t=").push_u64(1);
        assert!(t.fits());
        assert_eq!(cut(t.as_bytes()).unwrap(), "\"api\";r=42;t=1");
        let mut long = Text::default();
        long.push(&[b'a'; 200]);
        assert!(!long.fits() && long.as_bytes().len() == 128, "cut off at the stack buffer");
        assert!(cut(b"bad\nvalue").is_none(), "checked like from_bytes");
        // Values cut from one block stay intact as the block fills and is replaced.
        let all: Vec<HeaderValue> = (0..2000).map(number).collect();
        assert!(all.iter().enumerate().all(|(i, v)| v == i.to_string().as_str()));
        assert_eq!(cut(&[b'x'; 5000]).unwrap().len(), 5000, "longer than a block");
        let [a, b] = cut_all([b"12", b"ab"]).unwrap();
        assert!(a == "12" && b == "ab");
        assert!(cut_all([b"ok", b"no\r"]).is_none());
    }
}
