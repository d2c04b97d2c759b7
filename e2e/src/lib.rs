//! End-to-end tests of MiniToolStream live in `tests/`: they start ingress and
//! egress in-process on ephemeral ports against the real Tarantool and S3
//! server that `scripts/test.sh` runs, and drive them with gRPC clients and
//! the real `grpcurl` binary.

#![forbid(unsafe_code)]
