//! What the server's integration tests share: the in-process cluster of maru-testkit (a
//! resource manager and a metadata server on 127.0.0.1:0 with a shm pool in a temp dir under
//! /dev/shm), clients that speak the protocol directly, raw connections for hand-made bytes,
//! and one sample frame of every message type.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;

use maru_proto::stats::ServerStats;
use maru_proto::*;
use maru_transport::{BlockingConn, CallError, FrameBuf};

// Not every test file uses every item.
#[allow(unused_imports)]
pub use maru_testkit::{
    pool_path, shm_pool, temp_dir, wait_until, wire, InProcessCluster, MIB, TIMEOUT,
};

/// The protocol clients a test opens on a cluster.
pub trait RawClients {
    /// A client of instance `instance`.
    fn client(&self, instance: &str) -> Client;
    /// An operator connection (reads only).
    fn admin(&self) -> Client;
    /// A client of instance `instance` and the id of a fresh 1 MiB region it owns.
    fn owner(&self, instance: &str) -> (Client, u64) {
        let mut c = self.client(instance);
        let region = c.region(MIB).handle.region_id;
        (c, region)
    }
}

/// A cluster started with defaults, a client of instance `instance` on it and the id of a
/// fresh 1 MiB region that client owns.
pub fn cluster_with_owner(instance: &str) -> (InProcessCluster, Client, u64) {
    let c = InProcessCluster::start();
    let (client, region) = c.owner(instance);
    (c, client, region)
}

impl RawClients for InProcessCluster {
    fn client(&self, instance: &str) -> Client {
        Client::connect(&self.url(), instance)
    }

    fn admin(&self) -> Client {
        Client::connect_role(&self.url(), Role::Admin, "", None).unwrap()
    }
}

/// A plain request/reply client (no client library: tests speak the protocol directly).
pub struct Client {
    pub conn: BlockingConn,
    pub token: [u8; SESSION_TOKEN_LEN],
}

impl Client {
    pub fn connect(url: &ServerUrl, instance: &str) -> Client {
        Self::connect_role(url, Role::Client, instance, None).expect("client connects")
    }

    pub fn connect_role(
        url: &ServerUrl,
        role: Role,
        instance: &str,
        token: Option<[u8; SESSION_TOKEN_LEN]>,
    ) -> Result<Client, CallError> {
        let conn = wire::connect_as(url, role, instance, token)?;
        let token = conn.peer().session_token;
        Ok(Client { conn, token })
    }

    pub fn call(&mut self, req: &Request) -> Result<Response, CallError> {
        self.conn.call(req)
    }

    /// The error code of a request that must fail.
    pub fn fails(&mut self, req: &Request) -> ErrorCode {
        match self.call(req) {
            Err(CallError::Remote(e)) => e.code,
            other => panic!("{req:?} should fail with a typed error, got {other:?}"),
        }
    }

    pub fn region(&mut self, size: u64) -> RegionInfo {
        match self.call(&Request::RequestRegion { size }).unwrap() {
            Response::Region(r) => r,
            other => panic!("{other:?}"),
        }
    }

    pub fn register(&mut self, key: &[u8], region: u64, offset: u64, len: u64) -> bool {
        let req = Request::Register(RegisterEntry {
            key,
            region_id: region,
            offset,
            len,
        });
        match self.call(&req).unwrap() {
            Response::Bool(b) => b,
            other => panic!("{other:?}"),
        }
    }

    pub fn lookup(&mut self, key: &[u8]) -> Option<Location> {
        match self.call(&Request::Lookup { key }).unwrap() {
            Response::Lookup(l) => l,
            other => panic!("{other:?}"),
        }
    }

    pub fn bool(&mut self, req: &Request) -> bool {
        match self.call(req).unwrap() {
            Response::Bool(b) => b,
            other => panic!("{other:?}"),
        }
    }

    pub fn delete(&mut self, key: &[u8]) -> DeleteStatus {
        match self.call(&Request::Delete { key }).unwrap() {
            Response::Delete(s) => s,
            other => panic!("{other:?}"),
        }
    }

    pub fn allocations(&mut self) -> Vec<RegionRecord> {
        match self.call(&Request::ListAllocations).unwrap() {
            Response::Allocations(v) => v,
            other => panic!("{other:?}"),
        }
    }

    pub fn stats(&mut self) -> ServerStats {
        match self.call(&Request::Stats).unwrap() {
            Response::Stats(json) => serde_json::from_str(&json).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    pub fn goodbye(mut self) {
        assert_eq!(self.call(&Request::Goodbye).unwrap(), Response::Ok);
    }
}

/// A raw TCP connection for sending hand-made bytes.
pub struct Raw {
    pub stream: TcpStream,
    pub rx: FrameBuf,
}

impl Raw {
    pub fn connect(url: &ServerUrl) -> Raw {
        let ServerUrl::Tcp(addr) = url else {
            panic!("raw connections are TCP")
        };
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Raw {
            stream,
            rx: FrameBuf::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_request(&mut self, id: u64, req: &Request) {
        let mut buf = Vec::new();
        encode_request(&mut buf, id, req).unwrap();
        self.send(&buf);
    }

    /// The next reply: its request id and body.
    pub fn recv(&mut self) -> (u64, Response) {
        let (h, p) = self.rx.read_frame(&mut self.stream).expect("a reply");
        (h.request_id, decode_response(&h, p).expect("a valid reply"))
    }

    pub fn recv_error(&mut self) -> (u64, ErrorCode) {
        match self.recv() {
            (id, Response::Error(e)) => (id, e.code),
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }

    pub fn hello(&mut self, instance: &str) {
        self.send_request(
            1,
            &Request::Hello(Hello {
                role: Role::Client,
                instance_id: instance,
                host: "h",
                pid: 1,
                start_time: 0,
                session_token: None,
                namespace: "",
            }),
        );
        assert!(matches!(self.recv(), (1, Response::HelloOk(_))));
    }
}

/// One valid encoded frame of every request and response type, named for the corpus.
pub fn sample_frames() -> Vec<(String, Vec<u8>)> {
    let handle = Handle {
        region_id: 7,
        pool: "/dev/shm/maru/pool0".into(),
        offset: 2 * MIB,
        len: 4 * MIB,
        owner: "host:1234".into(),
        token: [0xab; TOKEN_LEN],
    };
    let access = Access {
        path: "/dev/shm/maru/pool0".into(),
        offset: 2 * MIB,
        len: 4 * MIB,
        page_size: 4096,
        pool_uuid: [7; 16],
    };
    let region = RegionInfo {
        handle: handle.clone(),
        access: access.clone(),
    };
    let entry = RegisterEntry {
        key: b"model/layer0/chunk-0001",
        region_id: 7,
        offset: 8192,
        len: 65536,
    };
    let keys: Vec<&[u8]> = vec![b"chunk-a", b"chunk-b", b""];
    let hello = Hello {
        role: Role::Client,
        instance_id: "inst-1",
        host: "host",
        pid: 1234,
        start_time: 99,
        session_token: Some([5; SESSION_TOKEN_LEN]),
        namespace: "",
    };
    let requests: Vec<Request> = vec![
        Request::Hello(hello.clone()),
        Request::Hello(Hello {
            role: Role::Admin,
            session_token: None,
            namespace: "",
            ..hello
        }),
        Request::Heartbeat,
        Request::Goodbye,
        Request::RmAlloc {
            size: MIB,
            pool: Some("/dev/shm/p"),
        },
        Request::RmAlloc {
            size: MIB,
            pool: None,
        },
        Request::RmFree {
            handle: handle.clone(),
        },
        Request::RmGetAccess {
            handle: handle.clone(),
        },
        Request::RmStats,
        Request::RmList,
        Request::RequestRegion { size: 4 * MIB },
        Request::ReturnRegion { region_id: 7 },
        Request::Register(entry),
        Request::BatchRegister(vec![entry, entry]),
        Request::Lookup { key: b"chunk-a" },
        Request::BatchLookup { keys: keys.clone() },
        Request::Exists { key: b"chunk-a" },
        Request::BatchExists { keys: keys.clone() },
        Request::Delete { key: b"chunk-a" },
        Request::BatchDelete { keys: keys.clone() },
        Request::Pin { key: b"chunk-a" },
        Request::BatchPin { keys: keys.clone() },
        Request::Unpin { key: b"chunk-a" },
        Request::BatchUnpin { keys: keys.clone() },
        Request::Touch { keys: keys.clone() },
        Request::Ahead { in_us: 300 },
        Request::Hit {
            hits: keys.iter().map(|&key| KeyCount { key, count: 2 }).collect(),
        },
        Request::ListAllocations,
        Request::Stats,
        Request::GetRegion { region_id: 7 },
        Request::ListRegions,
        Request::Descriptor {
            region_id: 7,
            writable: true,
        },
        Request::Resume {
            hello: Hello {
                session_token: Some([3; SESSION_TOKEN_LEN]),
                ..hello.clone()
            },
            regions: vec![7, 9],
            pins: vec![ResumePin {
                key: b"chunk-0",
                count: 2,
            }],
            holds: vec![ResumeHold {
                key: b"chunk-1",
                page: PageRef {
                    region_id: 7,
                    offset: 8192,
                },
                generation: 5,
                count: 1,
            }],
        },
    ];
    let responses: Vec<Response> = vec![
        Response::HelloOk(HelloOk {
            server: "maru-server 0.1.0".into(),
            hostname: "host".into(),
            session_token: [3; SESSION_TOKEN_LEN],
            index: None,
        }),
        Response::Ok,
        Response::Error(WireError::new(ErrorCode::NotOwner, "region 7 belongs to b")),
        Response::Handle(handle.clone()),
        Response::Access(access),
        Response::RmStats("{\"pools\":[]}".into()),
        Response::RmAllocations(vec![RmAllocation {
            handle: handle.clone(),
            owner_host: "host".into(),
            owner_pid: 1,
            owner_start_time: 2,
            connected: true,
        }]),
        Response::Region(region.clone()),
        Response::Descriptor {
            offset: 4096,
            len: 2 << 20,
            writable: false,
        },
        Response::Bool(true),
        Response::Bools(vec![true, false, true]),
        Response::Lookup(Some(Location {
            region: region.clone(),
            offset: 4096,
            len: 100,
            generation: 3,
        })),
        Response::Lookup(None),
        Response::BatchLookup {
            regions: vec![region.clone()],
            entries: vec![
                Some(Slot {
                    region_index: 0,
                    offset: 0,
                    len: 5,
                    generation: 4,
                }),
                None,
            ],
        },
        Response::Delete(DeleteStatus::Pinned),
        Response::BatchDelete(vec![
            DeleteStatus::Deleted,
            DeleteStatus::NotFound,
            DeleteStatus::Pinned,
        ]),
        Response::Allocations(vec![RegionRecord {
            handle,
            instance_id: "inst-1".into(),
            ref_count: 3,
            owner_connected: false,
        }]),
        Response::Stats("{\"keys\":1}".into()),
        Response::Regions(vec![region]),
        Response::Resumed {
            refused: vec![9],
            refused_pins: vec![],
            refused_holds: vec![0],
            hello: HelloOk {
                server: "maru-server 0.1.0".into(),
                hostname: "host".into(),
                session_token: [3; SESSION_TOKEN_LEN],
                index: None,
            },
        },
    ];
    let mut out = Vec::new();
    let mut names = std::collections::HashMap::<String, usize>::new();
    let mut name = |base: &str| {
        let n = names.entry(base.to_owned()).or_default();
        *n += 1;
        if *n == 1 {
            base.to_owned()
        } else {
            format!("{base}-{n}")
        }
    };
    for (i, req) in requests.iter().enumerate() {
        let mut buf = Vec::new();
        encode_request(&mut buf, i as u64 + 1, req).unwrap();
        out.push((name(&format!("req-{}", req.name())), buf));
    }
    for (i, resp) in responses.iter().enumerate() {
        let mut buf = Vec::new();
        encode_response(&mut buf, i as u64 + 1, resp).unwrap();
        let base = format!("{resp:?}")
            .split(|c: char| !c.is_alphanumeric())
            .next()
            .unwrap_or("resp")
            .to_lowercase();
        out.push((name(&format!("resp-{base}")), buf));
    }
    out
}
