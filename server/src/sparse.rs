//! Writing what a client sends with its runs of zeros left as holes. A job
//! file is mostly the zeros that pad it to the size its submitter wants
//! back, and a result the zeros after its archive: a hole costs the disk
//! nothing to write or to sync (a 10 MiB upload of a small job was 10 MiB
//! written and synced; now it is the archive's few blocks). What is read
//! back is the same bytes, and the file has the same length.

use std::io::{self, SeekFrom};

use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// The unit a run of zeros is left out in: a filesystem block.
const BLOCK: u64 = 4096;

pub struct SparseWriter<'a> {
    file: &'a mut tokio::fs::File,
    /// Bytes written or skipped so far, whole blocks: where `block` starts.
    len: u64,
    /// Zeros not written yet (the file's offset is `len - zeros`).
    zeros: u64,
    /// The start of the next block, until it is whole.
    block: Vec<u8>,
}

impl<'a> SparseWriter<'a> {
    /// Writes into `file` from its start.
    pub fn new(file: &'a mut tokio::fs::File) -> SparseWriter<'a> {
        SparseWriter { file, len: 0, zeros: 0, block: Vec::with_capacity(BLOCK as usize) }
    }

    /// Appends `bytes`: each whole block of zeros (at a block's offset in
    /// the file) is skipped, everything else written, a run of blocks with
    /// data in one write.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut rest = bytes;
        if !self.block.is_empty() {
            let take = (BLOCK as usize - self.block.len()).min(rest.len());
            self.block.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.block.len() < BLOCK as usize {
                return Ok(());
            }
            let block = std::mem::take(&mut self.block);
            self.blocks(&block).await?;
            self.block = block;
            self.block.clear();
        }
        let whole = rest.len() - rest.len() % BLOCK as usize;
        self.blocks(&rest[..whole]).await?;
        self.block.extend_from_slice(&rest[whole..]);
        Ok(())
    }

    /// Ends the file at its length (zeros at its end are a hole too); the bytes written or skipped.
    pub async fn finish(mut self) -> io::Result<u64> {
        let tail = std::mem::take(&mut self.block);
        if tail.iter().all(|b| *b == 0) {
            self.zeros += tail.len() as u64;
            self.len += tail.len() as u64;
        } else {
            self.skip_zeros().await?;
            self.file.write_all(&tail).await?;
            self.len += tail.len() as u64;
        }
        if self.zeros > 0 {
            self.file.flush().await?;
            self.file.set_len(self.len).await?;
            self.file.seek(SeekFrom::Start(self.len)).await?;
            self.zeros = 0;
        }
        self.file.flush().await?;
        Ok(self.len)
    }

    /// Whole blocks: runs of zeros skipped, runs of data written.
    async fn blocks(&mut self, bytes: &[u8]) -> io::Result<()> {
        let size = BLOCK as usize;
        let zero = |at: usize| bytes[at..at + size].iter().all(|x| *x == 0);
        let mut at = 0;
        while at < bytes.len() {
            if zero(at) {
                self.zeros += BLOCK;
                self.len += BLOCK;
                at += size;
                continue;
            }
            let mut end = at + size;
            while end < bytes.len() && !zero(end) {
                end += size;
            }
            self.skip_zeros().await?;
            self.file.write_all(&bytes[at..end]).await?;
            self.len += (end - at) as u64;
            at = end;
        }
        Ok(())
    }

    async fn skip_zeros(&mut self) -> io::Result<()> {
        if self.zeros > 0 {
            self.file.seek(SeekFrom::Current(self.zeros as i64)).await?;
            self.zeros = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    async fn written(chunks: &[Vec<u8>]) -> (Vec<u8>, u64) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("f");
        let mut file = tokio::fs::File::create(&path).await.expect("create");
        let mut w = SparseWriter::new(&mut file);
        for c in chunks {
            w.write(c).await.expect("write");
        }
        let len = w.finish().await.expect("finish");
        file.sync_all().await.expect("sync");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(meta.len(), len);
        (std::fs::read(&path).expect("read"), meta.blocks() * 512)
    }

    #[tokio::test]
    async fn the_same_bytes_come_back_and_the_padding_takes_no_room() {
        // A small archive, then 10 MiB of padding, in chunks that do not fall on blocks.
        let mut data = vec![0u8; 10 << 20];
        data[..5000].iter_mut().enumerate().for_each(|(i, b)| *b = (i % 251) as u8 + 1);
        data[70_000] = 7; // one stray byte in the padding
        let chunks: Vec<Vec<u8>> = data.chunks(16_411).map(<[u8]>::to_vec).collect();
        let (back, on_disk) = written(&chunks).await;
        assert!(back == data, "the bytes differ");
        assert!(on_disk <= 64 << 10, "{on_disk} bytes on disk for about 8 KiB of data");

        // Nothing but data, zeros at the start, a short file of zeros, and nothing at all.
        for data in [vec![9u8; 20_000], [vec![0u8; 9000], vec![3u8; 10]].concat(), vec![0u8; 100], vec![]] {
            let chunks: Vec<Vec<u8>> = data.chunks(3000).map(<[u8]>::to_vec).collect();
            assert!(written(&chunks).await.0 == data);
        }
    }
}
