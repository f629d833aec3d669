//! A kubelet pod-resources server on a unix socket, serving what the test
//! sets: `List` always, `Get` unless switched off (as on kubelets before
//! 1.27). Stopping it removes the socket, as a kubelet restart does.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use podgpu_proto::podresources::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use podgpu_proto::podresources::{
    ContainerDevices, ContainerResources, GetPodResourcesRequest, GetPodResourcesResponse, ListPodResourcesRequest,
    ListPodResourcesResponse, PodResources,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// One pod's assignment: (namespace, name, [(container, resource, device ids)]).
pub type PodAssignment = (String, String, Vec<(String, String, Vec<String>)>);

#[derive(Clone, Default)]
struct State {
    pods: Arc<Mutex<Vec<PodAssignment>>>,
    get_supported: bool,
    lists: Arc<AtomicU64>,
    gets: Arc<AtomicU64>,
}

/// A running fake kubelet.
pub struct FakeKubelet {
    socket: PathBuf,
    state: State,
    stop: CancellationToken,
}

fn to_proto((namespace, name, containers): &PodAssignment) -> PodResources {
    PodResources {
        name: name.clone(),
        namespace: namespace.clone(),
        containers: containers
            .iter()
            .map(|(container, resource, ids)| ContainerResources {
                name: container.clone(),
                devices: vec![ContainerDevices { resource_name: resource.clone(), device_ids: ids.clone() }],
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl PodResourcesLister for State {
    async fn list(
        &self,
        _request: Request<ListPodResourcesRequest>,
    ) -> Result<Response<ListPodResourcesResponse>, Status> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        let pods = self.pods.lock().unwrap();
        Ok(Response::new(ListPodResourcesResponse { pod_resources: pods.iter().map(to_proto).collect() }))
    }

    async fn get(&self, request: Request<GetPodResourcesRequest>) -> Result<Response<GetPodResourcesResponse>, Status> {
        if !self.get_supported {
            return Err(Status::unimplemented("Get needs the KubeletPodResourcesGet feature gate"));
        }
        self.gets.fetch_add(1, Ordering::Relaxed);
        let request = request.into_inner();
        let pods = self.pods.lock().unwrap();
        let pod = pods.iter().find(|(ns, name, _)| *ns == request.pod_namespace && *name == request.pod_name);
        match pod {
            Some(pod) => Ok(Response::new(GetPodResourcesResponse { pod_resources: Some(to_proto(pod)) })),
            None => Err(Status::not_found(format!("pod {}/{} not found", request.pod_namespace, request.pod_name))),
        }
    }
}

impl FakeKubelet {
    /// Serves `pods` on `socket`.
    pub fn start(socket: &Path, pods: Vec<PodAssignment>, get_supported: bool) -> std::io::Result<Self> {
        let state = State { pods: Arc::new(Mutex::new(pods)), get_supported, ..State::default() };
        let stop = CancellationToken::new();
        Self::serve(socket, state.clone(), stop.clone())?;
        Ok(Self { socket: socket.to_path_buf(), state, stop })
    }

    fn serve(socket: &Path, state: State, stop: CancellationToken) -> std::io::Result<()> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(state))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.cancelled_owned()),
        );
        Ok(())
    }

    /// Replaces the assignments.
    pub fn set_pods(&self, pods: Vec<PodAssignment>) {
        *self.state.pods.lock().unwrap() = pods;
    }

    /// Stops serving and removes the socket (kubelet going down).
    pub fn stop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Serves again on a new socket at the same path (kubelet back up).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.stop = CancellationToken::new();
        Self::serve(&self.socket, self.state.clone(), self.stop.clone())
    }

    /// `List` and `Get` calls answered so far.
    pub fn calls(&self) -> (u64, u64) {
        (self.state.lists.load(Ordering::Relaxed), self.state.gets.load(Ordering::Relaxed))
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop();
    }
}
