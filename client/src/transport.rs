//! Which path a client's reads take, by name: `auto`, `shm`, `bulk`,
//! `grpc`, `as-given`. One vocabulary for every front end (storagectl's
//! `--transport`, Python's `transport=`), so each path can be forced and
//! measured by hand, and a forced path that is not there fails when the
//! client connects, naming why, rather than quietly taking another.

use crate::{BulkTcp, Client, ClientError, ConnectOptions};

/// A read path a client is told to take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Transport {
    /// The fastest path there is: a loopback url moves to storaged's Unix
    /// socket (shared memory) when this process may use it; a remote one
    /// reads over the TCP bulk channel where storaged offers it, else gRPC.
    #[default]
    Auto,
    /// Storaged's Unix socket and shared-memory regions, or fail.
    Shm,
    /// The TCP bulk channel, or fail.
    Bulk,
    /// gRPC over the url's transport only.
    Grpc,
    /// The url's transport, with the TCP bulk channel where offered.
    AsGiven,
}

impl Transport {
    /// Every name [`std::str::FromStr`] takes, in the order help shows.
    pub const NAMES: [&'static str; 5] = ["auto", "shm", "bulk", "grpc", "as-given"];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Shm => "shm",
            Transport::Bulk => "bulk",
            Transport::Grpc => "grpc",
            Transport::AsGiven => "as-given",
        }
    }

    /// Sets what this path implies in `options` (the TCP bulk channel's
    /// policy; gRPC-only also sends same-host region reads over gRPC).
    pub fn apply(self, options: &mut ConnectOptions) {
        options.bulk_tcp = match self {
            Transport::Grpc => BulkTcp::Off,
            Transport::Bulk => BulkTcp::Required,
            _ => BulkTcp::Auto,
        };
        if self == Transport::Grpc {
            options.read_into_over_grpc = true;
        }
    }

    /// Whether whole-object reads (cat, export) should land in memory
    /// regions rather than come as gRPC streams: always for `shm`, from a
    /// remote storaged that offers its TCP bulk channel otherwise (a
    /// same-host client streams over the Unix socket unless told `shm`).
    pub async fn reads_into_regions(self, client: &Client) -> bool {
        match self {
            Transport::Shm => true,
            Transport::Grpc => false,
            _ => !client.is_local() && client.reads_into_regions().await,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Transport {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => Transport::Auto,
            "shm" => Transport::Shm,
            "bulk" => Transport::Bulk,
            "grpc" => Transport::Grpc,
            "as-given" => Transport::AsGiven,
            other => {
                return Err(ClientError::InvalidArgument(format!(
                    "transport {other:?} is none of {}",
                    Transport::NAMES.join(", ")
                )));
            }
        })
    }
}

impl Client {
    /// Connects to `url` to read over `transport` (its policy applied to a
    /// copy of `options`). A forced path that is not there fails here with
    /// [`ClientError::TransportUnavailable`]: `shm` without a usable Unix
    /// socket (the reason [`Client::not_local_because`] gives), `bulk` on
    /// the same host or where storaged offers no TCP bulk channel.
    pub async fn connect_transport(
        url: &str,
        transport: Transport,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let mut options = options.clone();
        transport.apply(&mut options);
        let mut client = match transport {
            Transport::Auto | Transport::Shm => Self::connect_auto_with(url, &options).await?,
            _ => Self::connect_with(url, &options).await?,
        };
        client.transport = transport;
        let unavailable = |reason: String| ClientError::TransportUnavailable {
            transport: transport.name(),
            reason,
        };
        match transport {
            Transport::Shm if !client.is_local() => Err(unavailable(
                client
                    .not_local_because()
                    .unwrap_or("the connection is not on storaged's Unix socket")
                    .to_owned(),
            )),
            Transport::Bulk if client.is_local() => Err(unavailable(format!(
                "{url} is storaged's Unix socket; the TCP bulk channel needs a TCP url (http://HOST:PORT)"
            ))),
            Transport::Bulk if !client.reads_into_regions().await => Err(unavailable(format!(
                "storaged at {url} offers no TCP bulk channel (Status says no port; is it serving with TLS, or bulk_listen = \"off\"?)"
            ))),
            _ => Ok(client),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_itself() {
        for name in Transport::NAMES {
            let t: Transport = name.parse().unwrap();
            assert_eq!(t.name(), name);
        }
        let err = "rdma".parse::<Transport>().unwrap_err();
        assert!(err.to_string().contains("\"rdma\""), "{err}");
        assert!(err.to_string().contains("as-given"), "{err}");
    }

    #[test]
    fn grpc_turns_the_bulk_channels_off_and_bulk_requires_it() {
        let mut o = ConnectOptions::default();
        Transport::Grpc.apply(&mut o);
        assert_eq!(o.bulk_tcp, BulkTcp::Off);
        assert!(o.read_into_over_grpc);
        Transport::Bulk.apply(&mut o);
        assert_eq!(o.bulk_tcp, BulkTcp::Required);
        Transport::AsGiven.apply(&mut o);
        assert_eq!(o.bulk_tcp, BulkTcp::Auto);
    }
}
