//! A minimal keep-alive HTTP/1.1 client on a tokio `TcpStream`, the load generator's transport.
//!
//! A benchmark client must cost far less than the server it measures, since both share the same
//! two cores: one request is one `write` of a reused buffer (head and body together, so no Nagle
//! delay splits them) and reading the answer parses only the status line and the framing headers
//! (`Content-Length` or chunked). No connection pool, no redirects, no TLS: it talks to the
//! `kairos serve` child the benchmark started, on loopback.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One keep-alive connection.
pub struct Conn {
    addr: SocketAddr,
    stream: TcpStream,
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes of `buf` received and not yet consumed start at `pos` and end at `len`.
    pos: usize,
    len: usize,
    body: Range<usize>,
    chunked_body: Vec<u8>,
    chunked: bool,
}

/// A response: status and body (borrowed from the connection until the next request).
pub struct Response<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            addr,
            stream,
            out: Vec::with_capacity(4096),
            buf: vec![0; 16 * 1024],
            pos: 0,
            len: 0,
            body: 0..0,
            chunked_body: Vec::new(),
            chunked: false,
        })
    }

    pub async fn get(&mut self, path: &str) -> io::Result<Response<'_>> {
        self.request("GET", path, None).await
    }

    pub async fn post(&mut self, path: &str, body: &[u8]) -> io::Result<Response<'_>> {
        self.request("POST", path, Some(body)).await
    }

    pub async fn put(&mut self, path: &str, body: &[u8]) -> io::Result<Response<'_>> {
        self.request("PUT", path, Some(body)).await
    }

    /// Sends one request and reads its response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response<'_>> {
        self.out.clear();
        self.out.extend_from_slice(method.as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(path.as_bytes());
        self.out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.out.extend_from_slice(self.addr.to_string().as_bytes());
        if let Some(body) = body {
            self.out.extend_from_slice(
                format!(
                    "\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            self.out.extend_from_slice(body);
        } else {
            self.out.extend_from_slice(b"\r\n\r\n");
        }
        self.stream.write_all(&self.out).await?;
        let status = self.read_response().await?;
        let body = if self.chunked {
            &self.chunked_body[..]
        } else {
            &self.buf[self.body.clone()]
        };
        Ok(Response { status, body })
    }

    /// Reads more bytes into the buffer (growing it when full). Fails on end of stream.
    async fn fill(&mut self) -> io::Result<()> {
        if self.len == self.buf.len() {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.len, 0);
                self.len -= self.pos;
                self.pos = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let n = self.stream.read(&mut self.buf[self.len..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.len += n;
        Ok(())
    }

    async fn read_response(&mut self) -> io::Result<u16> {
        // Start at the front of the buffer with whatever a previous read left over.
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        let head_end = loop {
            if let Some(i) = find(&self.buf[..self.len], b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| invalid("response head is not UTF-8"))?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        let mut content_length = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
        self.pos = head_end;
        self.chunked = chunked;
        if chunked {
            self.read_chunked().await?;
        } else {
            let n = content_length.unwrap_or(0);
            while self.len - self.pos < n {
                self.fill().await?;
            }
            self.body = self.pos..self.pos + n;
            self.pos += n;
        }
        Ok(status)
    }

    async fn read_chunked(&mut self) -> io::Result<()> {
        self.chunked_body.clear();
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf[self.pos..self.len], b"\r\n") {
                    break self.pos + i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[self.pos..line_end])
                .map_err(|_| invalid("bad chunk size"))?;
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size =
                usize::from_str_radix(size_text, 16).map_err(|_| invalid("bad chunk size"))?;
            self.pos = line_end + 2;
            // The chunk, then its CRLF (after the last, empty chunk: the final CRLF).
            while self.len - self.pos < size + 2 {
                self.fill().await?;
            }
            self.chunked_body
                .extend_from_slice(&self.buf[self.pos..self.pos + size]);
            self.pos += size + 2;
            if size == 0 {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn keep_alive_content_length_and_chunked() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let responses: [&[u8]; 2] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            ];
            for response in responses {
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    seen.extend_from_slice(&buf[..n]);
                    if find(&seen, b"\r\n\r\n").is_some() {
                        break;
                    }
                }
                seen.clear();
                s.write_all(response).await.unwrap();
            }
        });
        let mut c = Conn::connect(addr).await.unwrap();
        let r = c.post("/x", b"{}").await.unwrap();
        assert_eq!((r.status, r.body), (200, &b"hello"[..]));
        let r = c.get("/y").await.unwrap();
        assert_eq!((r.status, r.body), (404, &b"abcde"[..]));
        server.await.unwrap();
    }
}
