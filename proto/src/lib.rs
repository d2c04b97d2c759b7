//! The MiniToolStream wire contract: generated client and server code for
//! `minitoolstream.IngressService` and `minitoolstream.EgressService`, and the
//! encoded descriptor set that server reflection serves.

#![forbid(unsafe_code)]

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
