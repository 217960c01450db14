//! A static file server for pf's page on localhost: GET and HEAD of the files under one folder,
//! with the content types a browser needs (`application/wasm` above all). Used by
//! `cargo xtask web` and by the browser test (crates/pf-cli/tests/cli/web.rs includes this
//! file).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};

/// Serves `root` on `listener` until the process ends, one thread per connection.
pub fn serve(listener: TcpListener, root: PathBuf) {
    for stream in listener.incoming().flatten() {
        let root = root.clone();
        std::thread::spawn(move || {
            let _ = respond(stream, &root);
        });
    }
}

fn respond(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // The headers: read and dropped.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    if method != "GET" && method != "HEAD" {
        return reply(&mut stream, "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n", true);
    }
    let Some(path) = file_of(root, target) else {
        return reply(&mut stream, "404 Not Found", "text/plain", b"not found\n", method == "GET");
    };
    match std::fs::read(&path) {
        Ok(body) => reply(&mut stream, "200 OK", content_type(&path), &body, method == "GET"),
        Err(_) => reply(&mut stream, "404 Not Found", "text/plain", b"not found\n", method == "GET"),
    }
}

/// The file a request target names under `root`: the query dropped, `%XX` decoded, a folder's
/// `index.html`; `None` for anything that would leave `root`.
fn file_of(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let decoded = percent_decode(path)?;
    let relative = Path::new(decoded.trim_start_matches('/'));
    if relative.components().any(|c| !matches!(c, Component::Normal(_))) {
        return None;
    }
    let file = root.join(relative);
    Some(if file.is_dir() { file.join("index.html") } else { file })
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "css" => "text/css",
        _ => "application/octet-stream",
    }
}

fn reply(stream: &mut TcpStream, status: &str, kind: &str, body: &[u8], with_body: bool) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n", body.len());
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_map_to_files_inside_the_root_only() {
        let root = Path::new("/srv/web");
        assert_eq!(file_of(root, "/pkg/pf_web.wasm?x=1"), Some(root.join("pkg/pf_web.wasm")));
        assert_eq!(file_of(root, "/case/a%20b.png"), Some(root.join("case/a b.png")));
        assert_eq!(file_of(root, "/../etc/passwd"), None);
        assert_eq!(file_of(root, "/case/%2e%2e/%2e%2e/x"), None);
        assert_eq!(file_of(root, "/bad%zz"), None);
        assert_eq!(content_type(Path::new("x.wasm")), "application/wasm");
    }
}
