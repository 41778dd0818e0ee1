//! Two apps exchange data through cut-through, next to the same transfer over kernel TCP.
//!
//! Needs a running shuntd: `demo [APP_SOCKET] [BYTES]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Instant;

use shunt_client::{AttachOptions, Worker};

const CHUNK: usize = 64 * 1024;

fn pump(mut write: impl Write, bytes: u64) {
    let buf = vec![0x5au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        write.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
}

fn drain(mut read: impl Read) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match read.read(&mut buf).expect("read") {
            0 => return total,
            n => total += n as u64,
        }
    }
}

fn report(transport: &str, bytes: u64, secs: f64) -> f64 {
    let gbps = bytes as f64 * 8.0 / secs / 1e9;
    println!(
        "{transport:<14} {:>8.1} MiB in {secs:>6.3} s  {gbps:>7.2} Gbit/s",
        bytes as f64 / (1 << 20) as f64
    );
    gbps
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = args
        .next()
        .unwrap_or_else(|| "/run/shunt/shuntd.sock".into());
    let bytes: u64 = args.next().map_or(Ok(2 << 30), |b| b.parse())?;

    let server = Worker::attach(AttachOptions::new(&socket).app_name("demo-server"))?;
    let listener = server.listen("127.0.0.1:7777".parse()?)?;
    let client = Worker::attach(AttachOptions::new(&socket).app_name("demo-client"))?;
    let receiver = thread::spawn(move || {
        let s = listener.accept().expect("accept");
        drain(s)
    });
    let start = Instant::now();
    let mut s = client.connect("127.0.0.1:7777".parse()?)?;
    pump(&mut s, bytes);
    s.shutdown_write()?;
    let got = receiver.join().expect("receiver");
    let ct = report("cut-through", got, start.elapsed().as_secs_f64());
    assert_eq!(got, bytes, "cut-through lost bytes");

    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let addr = tcp.local_addr()?;
    let receiver = thread::spawn(move || drain(tcp.accept().expect("accept").0));
    let start = Instant::now();
    let mut c = TcpStream::connect(addr)?;
    pump(&mut c, bytes);
    c.shutdown(std::net::Shutdown::Write)?;
    let got = receiver.join().expect("receiver");
    let kernel = report("tcp-loopback", got, start.elapsed().as_secs_f64());
    println!("cut-through / kernel TCP: {:.2}x", ct / kernel);
    Ok(())
}
