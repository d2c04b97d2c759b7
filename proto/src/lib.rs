//! The MiniToolStream wire contract: generated client and server code for
//! `minitoolstream.IngressService` and `minitoolstream.EgressService`, and the
//! encoded descriptor set that server reflection serves.

#![forbid(unsafe_code)]

pub mod codec;

/// Generated messages, clients and servers of package `minitoolstream`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("minitoolstream");
}

/// The encoded `FileDescriptorSet` of the contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/minitoolstream_descriptor.bin"));

/// Fully qualified gRPC service names, as health checks and reflection use them.
pub mod service_names {
    /// `minitoolstream.IngressService`
    pub const INGRESS: &str = "minitoolstream.IngressService";
    /// `minitoolstream.EgressService`
    pub const EGRESS: &str = "minitoolstream.EgressService";
}

/// The path of every RPC of the contract (`/minitoolstream.Service/Method`),
/// read from the descriptor set: metrics label calls of any other path as
/// unknown, so that made-up paths cannot create label values.
pub fn method_paths() -> Vec<String> {
    use prost::Message;
    let Ok(set) = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET) else {
        return Vec::new();
    };
    set.file
        .iter()
        .flat_map(|file| {
            let package = file.package().to_owned();
            file.service.iter().flat_map(move |service| {
                let service_name = format!("{package}.{}", service.name());
                service
                    .method
                    .iter()
                    .map(move |method| format!("/{service_name}/{}", method.name()))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_rpc_has_its_path() {
        let paths = super::method_paths();
        for path in [
            "/minitoolstream.IngressService/Publish",
            "/minitoolstream.IngressService/PublishStream",
            "/minitoolstream.EgressService/Consume",
            "/minitoolstream.EgressService/FetchPayload",
        ] {
            assert!(paths.iter().any(|p| p == path), "{path} in {paths:?}");
        }
    }
}
