//! ggml's RPC backend: a process serves its devices over TCP (`serve_devices`), and a model can put
//! layers on such servers (`ModelParams::rpc`). The protocol has no authentication:
//! whoever reaches the port can run computations and read or write the served memory.

use std::ffi::{CStr, CString};
use std::net::{TcpStream, ToSocketAddrs};
use std::ptr::NonNull;
use std::time::Duration;

use super::sys;
use super::Backend;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("RPC endpoint `{0}` is not HOST:PORT")]
    BadEndpoint(String),
    #[error("RPC server {endpoint}: no device answered (is `kvtuner rpc-server` running there?)")]
    NoDevice { endpoint: String },
    #[error("RPC server {endpoint} is unreachable; is `kvtuner rpc-server` running there?")]
    Unreachable { endpoint: String, source: std::io::Error },
    #[error("no CPU device to serve")]
    NoCpu,
    #[error("no device named `{name}` to serve (this build has: {available})")]
    UnknownDevice { name: String, available: String },
}

/// A device of a registered RPC server (a handle owned by ggml's registry, valid for the
/// process's life).
#[derive(Debug, Clone, Copy)]
pub struct RpcDevice {
    raw: NonNull<sys::ggml_backend_device>,
}

// Safety: device handles are immutable registry entries that ggml never frees.
unsafe impl Send for RpcDevice {}
// Safety: see Send.
unsafe impl Sync for RpcDevice {}

impl RpcDevice {
    pub(crate) fn as_ptr(self) -> sys::ggml_backend_dev_t {
        self.raw.as_ptr()
    }

    /// ggml's name of the device, e.g. `RPC0`.
    pub fn name(self) -> String {
        // Safety: a valid device; ggml returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(sys::ggml_backend_dev_name(self.raw.as_ptr())) }.to_string_lossy().into_owned()
    }

    /// The server's description of the device (endpoint and remote device).
    pub fn description(self) -> String {
        // Safety: as `name`.
        unsafe { CStr::from_ptr(sys::ggml_backend_dev_description(self.raw.as_ptr())) }.to_string_lossy().into_owned()
    }
}

fn endpoint_c(endpoint: &str) -> Result<CString, RpcError> {
    let bad = || RpcError::BadEndpoint(endpoint.to_string());
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    CString::new(endpoint).map_err(|_| bad())
}

/// ggml aborts the process when an RPC server stops answering mid-run (its client has no error
/// path). This prints one line saying so, instead of ggml's backtrace, and exits with status 1.
extern "C" fn rpc_abort(message: *const std::ffi::c_char) {
    // Safety: ggml passes a NUL-terminated message.
    let m = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let m = m.split_once(": ").filter(|(file, _)| file.contains(".c")).map_or(&*m, |(_, msg)| msg);
    eprintln!("error: the llama.cpp runtime stopped: {m} (an RPC server stopped or the link to it broke; its layers are lost)");
    std::process::exit(1);
}

/// Connects to the RPC server at `endpoint` (HOST:PORT) and returns its devices. Registering the
/// same endpoint twice returns the same devices.
pub fn add_server(_backend: Backend, endpoint: &str) -> Result<Vec<RpcDevice>, RpcError> {
    let c = endpoint_c(endpoint)?;
    // Safety: installs a function that lives for the program.
    unsafe { sys::ggml_set_abort_callback(Some(rpc_abort)) };
    // ggml aborts the process when it cannot connect: try first, and say which server is down
    let unreachable = |source| RpcError::Unreachable { endpoint: endpoint.to_string(), source };
    let addr = endpoint
        .to_socket_addrs()
        .map_err(unreachable)?
        .next()
        .ok_or_else(|| unreachable(std::io::Error::other("no address")))?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(unreachable)?;
    // Safety: a valid C string; ggml keeps its own copy and returns its registry entry (or NULL).
    let reg = unsafe { sys::ggml_backend_rpc_add_server(c.as_ptr()) };
    if reg.is_null() {
        return Err(RpcError::NoDevice { endpoint: endpoint.to_string() });
    }
    // Safety: reg is a valid registry entry.
    let n = unsafe { sys::ggml_backend_reg_dev_count(reg) };
    let devices: Vec<RpcDevice> = (0..n)
        // Safety: i < the count of this registry.
        .filter_map(|i| NonNull::new(unsafe { sys::ggml_backend_reg_dev_get(reg, i) }))
        .map(|raw| RpcDevice { raw })
        .collect();
    if devices.is_empty() {
        return Err(RpcError::NoDevice { endpoint: endpoint.to_string() });
    }
    Ok(devices)
}

/// `add_server` for each endpoint, the devices in order.
pub fn add_servers(backend: Backend, endpoints: &[String]) -> Result<Vec<RpcDevice>, RpcError> {
    let mut devices = Vec::new();
    for e in endpoints {
        devices.extend(add_server(backend, e)?);
    }
    Ok(devices)
}

/// The devices in ggml's registry with their names (`CPU`, `CUDA0`, …).
fn registry_devices(_backend: Backend) -> Vec<(sys::ggml_backend_dev_t, String)> {
    // Safety: plain reads of ggml's device registry; i < the count; names are NUL-terminated.
    let n = unsafe { sys::ggml_backend_dev_count() };
    (0..n)
        .map(|i| {
            let dev = unsafe { sys::ggml_backend_dev_get(i) };
            (dev, unsafe { CStr::from_ptr(sys::ggml_backend_dev_name(dev)) }.to_string_lossy().into_owned())
        })
        .collect()
}

/// Serves the devices named in `names` (ggml's names, e.g. `CUDA0`; empty: the CPU) at `endpoint`
/// until the process ends (ggml's server loop does not return). `threads`: for a served CPU, 0 =
/// all cores.
pub fn serve_devices(backend: Backend, endpoint: &str, names: &[String], threads: usize) -> Result<(), RpcError> {
    let c = endpoint_c(endpoint)?;
    let mut devices = Vec::new();
    if names.is_empty() {
        // Safety: a plain lookup in ggml's registry.
        let cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
        if cpu.is_null() {
            return Err(RpcError::NoCpu);
        }
        devices.push(cpu);
    }
    let registry = registry_devices(backend);
    for name in names {
        let Some((dev, _)) = registry.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)) else {
            let available = registry.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>().join(", ");
            return Err(RpcError::UnknownDevice { name: name.clone(), available });
        };
        devices.push(*dev);
    }
    let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    // Safety: valid endpoint string, no cache directory (NULL), `devices` holds that many valid
    // registry devices.
    unsafe {
        sys::ggml_backend_rpc_start_server(c.as_ptr(), std::ptr::null(), threads, devices.len(), devices.as_mut_ptr())
    };
    Ok(())
}
