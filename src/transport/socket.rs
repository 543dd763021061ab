//! The server's connections: TCP with `TCP_NODELAY`, written without vectored I/O.
//!
//! h2 sends a DATA payload of more than 256 bytes as a buffer of its own when the socket takes
//! vectored writes, and only one such payload may wait to be written: every answer of a few
//! hundred bytes (a catalog, an application) then cost one `writev` of its own, and on
//! loopback each write is also the kernel delivering it and waking the reader. When the socket
//! does not take vectored writes, h2 copies payloads of up to 1 KiB into its 16 KiB write
//! buffer instead, and the answers that are ready go out in one write (README, Benchmarks:
//! about 4 µs of kernel time less per `ListPrograms` call at 256 in flight). Larger payloads
//! are still written as they are.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use futures::{Stream, TryStreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// One accepted connection.
pub struct Connection(TcpStream);

/// The listener's connections, `TCP_NODELAY` set on each.
pub fn incoming(listener: TcpListener) -> impl Stream<Item = io::Result<Connection>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(Connection)
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    /// The point of this type: h2 (and hyper's HTTP/1) buffer small writes instead.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn accepted_connections_carry_bytes_and_refuse_vectored_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut incoming = Box::pin(incoming(listener));
        let mut client = TcpStream::connect(address).await.expect("connect");
        let mut server = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");

        assert!(!server.is_write_vectored(), "h2 would chain payloads again");
        assert_eq!(
            server.connect_info().remote_addr(),
            Some(client.local_addr().expect("client address"))
        );
        assert!(server.0.nodelay().expect("nodelay"));

        server.write_all(b"answer").await.expect("write");
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"answer");
        client.write_all(b"call").await.expect("write");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"call");
    }
}
