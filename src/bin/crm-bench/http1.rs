//! A minimal HTTP/1.1 keep-alive client for the webhook load: one request at a time per
//! connection, bodies framed by `content-length` (what axum and gunicorn send for JSON).
//! Small on purpose: the load generator must cost far less CPU than the server it drives.

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
    host: String,
}

impl Connection {
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(8192),
            host: addr.to_owned(),
        })
    }

    /// POSTs `body` and returns the status and the response body.
    pub async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        for (k, v) in headers {
            request.extend_from_slice(k.as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(v.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);
        self.stream.write_all(&request).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> anyhow::Result<(u16, Vec<u8>)> {
        loop {
            if let Some(head_end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .with_context(|| format!("status line of {head:?}"))?;
                let mut length = None;
                for line in head.lines().skip(1) {
                    let Some((name, value)) = line.split_once(':') else {
                        continue;
                    };
                    if name.eq_ignore_ascii_case("content-length") {
                        length = Some(value.trim().parse::<usize>()?);
                    } else if name.eq_ignore_ascii_case("transfer-encoding") {
                        bail!("chunked responses are not supported by this client");
                    }
                }
                let length = length.context("a response without content-length")?;
                let total = head_end + 4 + length;
                while self.buf.len() < total {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        bail!("connection closed mid-body");
                    }
                }
                let body = self.buf[head_end + 4..total].to_vec();
                self.buf.drain(..total);
                return Ok((status, body));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed before a response");
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
