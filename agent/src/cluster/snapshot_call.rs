//! The node API's `Snapshot` call with its request encoded once per poll:
//! the same selection goes to every node, and encoding (and cloning) it a
//! thousand times per poll was a measurable share of the scaler's CPU.
use bytes::{BufMut as _, Bytes};
use podgpu_proto::node::{NodeSnapshot, SnapshotRequest};
use prost::Message as _;
use tonic::codec::{Codec, EncodeBuf, Encoder, ProstCodec};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::Status;

/// A `SnapshotRequest`, encoded.
#[derive(Clone, Debug)]
pub struct EncodedRequest(Bytes);

impl EncodedRequest {
    /// Encodes `request` once.
    pub fn new(request: &SnapshotRequest) -> Self {
        Self(request.encode_to_vec().into())
    }
}

/// A connection to one node agent.
#[derive(Clone, Debug)]
pub struct SnapshotClient(tonic::client::Grpc<Channel>);

impl SnapshotClient {
    /// A client over `channel`.
    pub fn new(channel: Channel) -> Self {
        Self(tonic::client::Grpc::new(channel))
    }

    /// Calls `Snapshot` with an encoded request.
    pub async fn snapshot(&mut self, request: &EncodedRequest) -> Result<NodeSnapshot, Status> {
        self.0.ready().await.map_err(|e| Status::unavailable(format!("node agent not ready: {e}")))?;
        let path = PathAndQuery::from_static("/podgpu.node.v1.NodeSignals/Snapshot");
        Ok(self.0.unary(tonic::Request::new(request.0.clone()), path, PreEncodedCodec).await?.into_inner())
    }
}

/// Writes request bytes as they are; reads the answer with prost.
#[derive(Clone, Copy, Debug, Default)]
struct PreEncodedCodec;

impl Codec for PreEncodedCodec {
    type Encode = Bytes;
    type Decode = NodeSnapshot;
    type Encoder = PreEncoded;
    type Decoder = <ProstCodec<(), NodeSnapshot> as Codec>::Decoder;

    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<(), NodeSnapshot>::default().decoder()
    }
}

#[derive(Debug)]
struct PreEncoded;

impl Encoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}
