//! Zeros written as data, in pieces of one shared buffer: for storages and images that
//! have no cheaper way to make a range read as zeros.

/// The longest piece of zeros written at once.
const ZERO_PIECE: usize = 1 << 20;

/// Zeros shared by every writer of zeros: no allocation, and the kernel maps the zero page.
static ZEROS: [u8; ZERO_PIECE] = [0; ZERO_PIECE];

/// `len` zero bytes, at most [`ZERO_PIECE`].
fn zeros(len: usize) -> &'static [u8] {
    &ZEROS[..len.min(ZERO_PIECE)]
}

/// Writes `len` zero bytes from `offset` by calling `write(zeros, at)` for consecutive
/// pieces of at most [`ZERO_PIECE`] bytes.
pub(crate) fn write_zeros<E>(
    offset: u64,
    len: u64,
    mut write: impl FnMut(&[u8], u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_PIECE as u64);
        write(zeros(n as usize), offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_written_in_pieces_that_tile_the_range() {
        let mut pieces = Vec::new();
        write_zeros::<()>(100, (2 << 20) + 5, |buf, at| {
            assert!(buf.iter().all(|&b| b == 0));
            pieces.push((at, buf.len() as u64));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            pieces,
            [
                (100, 1 << 20),
                (100 + (1 << 20), 1 << 20),
                (100 + (2 << 20), 5)
            ]
        );
        write_zeros::<()>(7, 0, |_, _| panic!("nothing to write")).unwrap();
    }
}
