//! Zeroing the part of a job file or job disk after the packed stream, so no
//! input byte survives and the file reads as one xz stream plus zero padding.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};

use nix::fcntl::{fallocate, FallocateFlags};

nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Copies the first `len` bytes of `src` to the same offsets of `dst`,
/// reading only its runs of data (`SEEK_DATA` to `SEEK_HOLE`: a job file's
/// padding is usually a hole) and writing only blocks that are not all
/// zeros, so holes stay holes. Never reads past `len`, whatever `src` has
/// grown to meanwhile. `dst` is not extended to `len`; the caller sets its length.
pub fn copy_data(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let seek = |from: u64, whence| {
        libc::off_t::try_from(from)
            .ok()
            .and_then(|p| nix::unistd::lseek(src, p, whence).ok())
            .and_then(|d| u64::try_from(d).ok())
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(pos, nix::unistd::Whence::SeekData).filter(|&d| d < len) else { break };
        // To the end of this run of data, so that no hole after it is read and written as zeros.
        let end = seek(data, nix::unistd::Whence::SeekHole).unwrap_or(len).min(len);
        let want = (end - data).clamp(1, buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], data)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], data)?;
        }
        pos = data + n as u64;
    }
    Ok(())
}

/// Size of a regular file or block device.
pub fn capacity(file: &mut File) -> io::Result<u64> {
    let end = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Zeroes `offset..end` of a regular file (by punching a hole) or of a block
/// device (by BLKZEROOUT); writes zeros where neither is supported.
pub fn zero_range(file: &File, offset: u64, end: u64) -> io::Result<()> {
    if offset >= end {
        return Ok(());
    }
    let ft = file.metadata()?.file_type();
    if ft.is_file() {
        let len = file.metadata()?.len();
        let end = end.min(len);
        if offset >= end {
            return Ok(());
        }
        let punched = fallocate(
            file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            (end - offset) as i64,
        );
        if punched.is_ok() {
            return Ok(());
        }
    } else if ft.is_block_device() {
        // BLKZEROOUT needs 512-byte alignment: write the unaligned head by hand.
        let aligned = offset.div_ceil(512) * 512;
        write_zeros(file, offset, aligned.min(end))?;
        if aligned < end && (end - aligned).is_multiple_of(512) {
            let range = [aligned, end - aligned];
            // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, which outlives the call.
            if unsafe { blkzeroout(file.as_raw_fd(), &range) }.is_ok() {
                return Ok(());
            }
        }
        return write_zeros(file, aligned.min(end), end);
    }
    write_zeros(file, offset, end)
}

fn write_zeros(file: &File, mut offset: u64, end: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    let mut f = file;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn zeroes_exactly_the_range() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(&[0xAAu8; 10_000]).expect("fill");
        zero_range(&f, 1000, 9000).expect("zero");
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut back).expect("read");
        assert_eq!(back.len(), 10_000);
        assert!(back[..1000].iter().all(|&b| b == 0xAA));
        assert!(back[1000..9000].iter().all(|&b| b == 0));
        assert!(back[9000..].iter().all(|&b| b == 0xAA));
        assert_eq!(capacity(&mut f).expect("size"), 10_000);
    }
}
