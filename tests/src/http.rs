//! A minimal HTTP/1.1 GET client for the agent's health, metrics and admin
//! endpoints, which live inside a node's network namespace.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use weir::netns::NetNs;

use crate::socket;

const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// `GET <path>` from inside `netns` to `addr`, reading the response until
/// the server closes the connection.
pub fn http_get(netns: &NetNs, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let url = format!("http://{addr}{path}");
    let mut stream =
        socket::connect(netns, addr).with_context(|| format!("cannot connect for GET {url}"))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("cannot send GET {url}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .with_context(|| format!("cannot read the response to GET {url}"))?;
    parse_response(&raw).with_context(|| format!("bad response to GET {url}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let head_end = find(raw, b"\r\n\r\n").context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).context("headers are not UTF-8")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        decode_chunked(body)?
    } else {
        body.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Servers send bodies of unknown length, such as a metrics page written
/// as it is gathered, in chunks.
fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").context("unterminated chunk size")?;
        let size_line =
            std::str::from_utf8(&rest[..line_end]).context("chunk size is not UTF-8")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_line:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).context("truncated chunk")?);
        rest = rest.get(size + 2..).context("truncated chunk")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_chunked_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nready";
        assert_eq!(
            parse_response(plain).unwrap(),
            HttpResponse {
                status: 200,
                body: "ready".into()
            }
        );
        let chunked = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnot \r\n5;x=y\r\nready\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked).unwrap(),
            HttpResponse {
                status: 503,
                body: "not ready".into()
            }
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
