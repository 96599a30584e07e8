//! Process-wide state that every VM sees: shared data (with CAS), shared queues and metrics.
//! Workers run on their own threads, so everything here is built for concurrent use.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use wasmgate_abi::{MetricType, Status};

#[derive(Default)]
pub struct Shared {
    pub data: SharedData,
    pub queues: SharedQueues,
    pub metrics: Metrics,
}

impl Shared {
    pub fn new(max_queue_length: usize) -> Self {
        Self {
            queues: SharedQueues {
                max_length: max_queue_length,
                ..SharedQueues::default()
            },
            ..Self::default()
        }
    }
}

// === impl SharedData ===

/// `(vm_id, key)`.
type SharedKey = (String, Vec<u8>);

/// Key-value store keyed by VM id, as Envoy scopes it: VMs with the same `vm_id` share entries.
#[derive(Default)]
pub struct SharedData {
    entries: RwLock<HashMap<SharedKey, (Vec<u8>, u32)>>,
    next_cas: AtomicU32,
}

impl SharedData {
    pub fn get(&self, vm_id: &str, key: &[u8]) -> Option<(Vec<u8>, u32)> {
        self.entries
            .read()
            .get(&(vm_id.to_owned(), key.to_vec()))
            .cloned()
    }

    /// Sets `key`; a non-zero `cas` must match an existing entry's current one. A missing key is
    /// created whatever the `cas`, as in Envoy (proxy-wasm-cpp-host's `SharedData::set`).
    pub fn set(&self, vm_id: &str, key: &[u8], value: &[u8], cas: u32) -> Status {
        let mut entries = self.entries.write();
        let slot = (vm_id.to_owned(), key.to_vec());
        if cas != 0
            && let Some((_, current)) = entries.get(&slot)
            && *current != cas
        {
            return Status::CasMismatch;
        }
        // CAS values are never 0: 0 means "unconditional" on the way in.
        let next = self
            .next_cas
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        entries.insert(slot, (value.to_vec(), next));
        Status::Ok
    }
}

// === impl SharedQueues ===

/// Where `on_queue_ready` for a queue goes: the inbox of the VM that registered it.
#[derive(Default)]
pub struct Inbox {
    ready: Mutex<Vec<(u32, u32)>>,
    waker: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Inbox {
    pub(crate) fn push(&self, root_context_id: u32, queue_id: u32) {
        {
            let mut ready = self.ready.lock();
            if !ready.contains(&(root_context_id, queue_id)) {
                ready.push((root_context_id, queue_id));
            }
        }
        if let Some(waker) = self.waker.lock().clone() {
            waker();
        }
    }

    pub(crate) fn take(&self) -> Vec<(u32, u32)> {
        std::mem::take(&mut *self.ready.lock())
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.ready.lock().is_empty()
    }

    pub(crate) fn set_waker(&self, waker: Arc<dyn Fn() + Send + Sync>) {
        *self.waker.lock() = Some(waker);
    }
}

struct Queue {
    items: VecDeque<Vec<u8>>,
    owner: Weak<Inbox>,
    owner_context: u32,
    /// For the one log line a full queue gets.
    vm_id: String,
    name: String,
    full_reported: bool,
}

#[derive(Default)]
struct QueueTable {
    by_name: HashMap<(String, String), u32>,
    queues: HashMap<u32, Queue>,
    next_id: u32,
}

/// Shared queues, named per VM id. The last VM to register a name receives its `on_queue_ready`.
pub struct SharedQueues {
    table: Mutex<QueueTable>,
    /// Most messages a queue holds before enqueue answers INTERNAL_FAILURE (a guard against a
    /// plugin that enqueues faster than anyone dequeues).
    max_length: usize,
}

impl Default for SharedQueues {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            max_length: DEFAULT_MAX_QUEUE_LENGTH,
        }
    }
}

pub const DEFAULT_MAX_QUEUE_LENGTH: usize = 10_000;

impl SharedQueues {
    pub fn register(
        &self,
        vm_id: &str,
        name: &str,
        owner: &Arc<Inbox>,
        root_context_id: u32,
    ) -> u32 {
        let mut table = self.table.lock();
        let key = (vm_id.to_owned(), name.to_owned());
        if let Some(&id) = table.by_name.get(&key) {
            let queue = table.queues.get_mut(&id).expect("named queue exists");
            queue.owner = Arc::downgrade(owner);
            queue.owner_context = root_context_id;
            return id;
        }
        table.next_id += 1;
        let id = table.next_id;
        table.by_name.insert(key, id);
        table.queues.insert(
            id,
            Queue {
                items: VecDeque::new(),
                owner: Arc::downgrade(owner),
                owner_context: root_context_id,
                vm_id: vm_id.to_owned(),
                name: name.to_owned(),
                full_reported: false,
            },
        );
        id
    }

    pub fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.table
            .lock()
            .by_name
            .get(&(vm_id.to_owned(), name.to_owned()))
            .copied()
    }

    pub fn enqueue(&self, queue_id: u32, message: Vec<u8>) -> Status {
        let notify = {
            let mut table = self.table.lock();
            let Some(queue) = table.queues.get_mut(&queue_id) else {
                return Status::NotFound;
            };
            if queue.items.len() >= self.max_length {
                if !queue.full_reported {
                    queue.full_reported = true;
                    tracing::warn!(
                        target: crate::LOG_TARGET,
                        vm_id = %queue.vm_id,
                        queue = %queue.name,
                        "shared queue is full at {} messages (plugin_limits.max_queue_length); \
                         enqueue answers INTERNAL_FAILURE until a message is dequeued",
                        self.max_length
                    );
                }
                return Status::InternalFailure;
            }
            queue.full_reported = false;
            queue.items.push_back(message);
            queue
                .owner
                .upgrade()
                .map(|inbox| (inbox, queue.owner_context))
        };
        if let Some((inbox, context)) = notify {
            inbox.push(context, queue_id);
        }
        Status::Ok
    }

    pub fn dequeue(&self, queue_id: u32) -> Result<Vec<u8>, Status> {
        let mut table = self.table.lock();
        let queue = table.queues.get_mut(&queue_id).ok_or(Status::NotFound)?;
        queue.items.pop_front().ok_or(Status::Empty)
    }
}

// === impl Metrics ===

/// Envoy's default histogram bucket bounds.
pub const HISTOGRAM_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

pub struct Metric {
    pub name: String,
    pub kind: MetricType,
    value: AtomicI64,
    histogram: Mutex<Histogram>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Cumulative counts per bound in [`HISTOGRAM_BUCKETS`].
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

/// A point-in-time reading of one metric, for exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSnapshot {
    pub name: String,
    pub kind: MetricType,
    pub value: i64,
    pub histogram: Option<Histogram>,
}

/// Plugin-defined metrics, process-wide: the same name defined by VMs on several workers is one
/// metric, as in Envoy.
#[derive(Default)]
pub struct Metrics {
    by_name: RwLock<HashMap<String, u32>>,
    entries: RwLock<Vec<Arc<Metric>>>,
    updates: AtomicU64,
}

impl Metrics {
    pub fn define(&self, kind: MetricType, name: &str) -> Result<u32, Status> {
        if let Some(&id) = self.by_name.read().get(name) {
            return self.check_kind(id, kind);
        }
        let mut by_name = self.by_name.write();
        if let Some(&id) = by_name.get(name) {
            return self.check_kind(id, kind);
        }
        let mut entries = self.entries.write();
        let id = entries.len() as u32 + 1;
        entries.push(Arc::new(Metric {
            name: name.to_owned(),
            kind,
            value: AtomicI64::new(0),
            histogram: Mutex::new(Histogram {
                buckets: vec![0; HISTOGRAM_BUCKETS.len()],
                ..Default::default()
            }),
        }));
        by_name.insert(name.to_owned(), id);
        Ok(id)
    }

    fn check_kind(&self, id: u32, kind: MetricType) -> Result<u32, Status> {
        match self.get(id) {
            Some(metric) if metric.kind == kind => Ok(id),
            _ => Err(Status::BadArgument),
        }
    }

    fn get(&self, id: u32) -> Option<Arc<Metric>> {
        let index = id.checked_sub(1)? as usize;
        self.entries.read().get(index).cloned()
    }

    /// Envoy's semantics: counters only go up, gauges move both ways, histograms take records.
    pub fn increment(&self, id: u32, delta: i64) -> Status {
        let Some(metric) = self.get(id) else {
            return Status::NotFound;
        };
        match metric.kind {
            MetricType::Counter if delta <= 0 => Status::BadArgument,
            MetricType::Counter | MetricType::Gauge => {
                metric.value.fetch_add(delta, Ordering::Relaxed);
                self.updates.fetch_add(1, Ordering::Relaxed);
                Status::Ok
            }
            MetricType::Histogram => Status::BadArgument,
        }
    }

    pub fn record(&self, id: u32, value: u64) -> Status {
        let Some(metric) = self.get(id) else {
            return Status::NotFound;
        };
        match metric.kind {
            // Envoy adds a record to a counter.
            MetricType::Counter => {
                metric.value.fetch_add(value as i64, Ordering::Relaxed);
            }
            MetricType::Gauge => metric.value.store(value as i64, Ordering::Relaxed),
            MetricType::Histogram => {
                let mut histogram = metric.histogram.lock();
                for (bucket, bound) in histogram.buckets.iter_mut().zip(HISTOGRAM_BUCKETS) {
                    if value as f64 <= bound {
                        *bucket += 1;
                    }
                }
                histogram.count += 1;
                histogram.sum += value as f64;
            }
        }
        self.updates.fetch_add(1, Ordering::Relaxed);
        Status::Ok
    }

    pub fn value(&self, id: u32) -> Result<u64, Status> {
        let metric = self.get(id).ok_or(Status::NotFound)?;
        match metric.kind {
            MetricType::Histogram => Err(Status::BadArgument),
            _ => Ok(metric.value.load(Ordering::Relaxed) as u64),
        }
    }

    pub fn snapshot(&self) -> Vec<MetricSnapshot> {
        self.entries
            .read()
            .iter()
            .map(|metric| MetricSnapshot {
                name: metric.name.clone(),
                kind: metric.kind,
                value: metric.value.load(Ordering::Relaxed),
                histogram: (metric.kind == MetricType::Histogram)
                    .then(|| metric.histogram.lock().clone()),
            })
            .collect()
    }

    pub fn find(&self, name: &str) -> Option<MetricSnapshot> {
        self.snapshot().into_iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_until_a_message_is_taken() {
        let shared = Shared::new(2);
        let inbox = Arc::new(Inbox::default());
        let queue = shared.queues.register("vm", "q", &inbox, 1);
        assert_eq!(shared.queues.enqueue(queue, b"1".to_vec()), Status::Ok);
        assert_eq!(shared.queues.enqueue(queue, b"2".to_vec()), Status::Ok);
        assert_eq!(
            shared.queues.enqueue(queue, b"3".to_vec()),
            Status::InternalFailure,
            "plugin_limits.max_queue_length"
        );
        assert_eq!(shared.queues.dequeue(queue), Ok(b"1".to_vec()));
        assert_eq!(shared.queues.enqueue(queue, b"3".to_vec()), Status::Ok);
    }

    #[test]
    fn cas_semantics() {
        let data = SharedData::default();
        assert_eq!(data.get("vm", b"k"), None);
        assert_eq!(data.set("vm", b"k", b"1", 0), Status::Ok);
        let (value, cas) = data.get("vm", b"k").unwrap();
        assert_eq!(value, b"1");
        assert_eq!(data.set("vm", b"k", b"2", cas + 1), Status::CasMismatch);
        assert_eq!(data.set("vm", b"k", b"2", cas), Status::Ok);
        assert_eq!(data.set("vm", b"k", b"3", cas), Status::CasMismatch);
        assert_eq!(data.get("other-vm", b"k"), None, "VM ids scope the data");
        // Envoy creates a missing key whatever the CAS.
        assert_eq!(data.set("vm", b"absent", b"x", 5), Status::Ok);
        assert_eq!(data.get("vm", b"absent").unwrap().0, b"x");
    }

    #[test]
    fn queues_notify_owner() {
        let queues = SharedQueues::default();
        let inbox = Arc::new(Inbox::default());
        let id = queues.register("vm", "q", &inbox, 7);
        assert_eq!(queues.register("vm", "q", &inbox, 7), id);
        assert_eq!(queues.resolve("vm", "q"), Some(id));
        assert_eq!(queues.resolve("other", "q"), None);
        assert_eq!(queues.dequeue(id), Err(Status::Empty));
        assert_eq!(queues.enqueue(id, b"a".to_vec()), Status::Ok);
        assert_eq!(queues.enqueue(id, b"b".to_vec()), Status::Ok);
        assert_eq!(
            inbox.take(),
            vec![(7, id)],
            "one notification per pending queue"
        );
        assert_eq!(queues.dequeue(id).unwrap(), b"a");
        assert_eq!(queues.enqueue(999, vec![]), Status::NotFound);
        assert_eq!(queues.dequeue(999), Err(Status::NotFound));
    }

    #[test]
    fn metric_semantics() {
        let metrics = Metrics::default();
        let counter = metrics.define(MetricType::Counter, "c").unwrap();
        assert_eq!(metrics.define(MetricType::Counter, "c"), Ok(counter));
        assert_eq!(
            metrics.define(MetricType::Gauge, "c"),
            Err(Status::BadArgument)
        );
        assert_eq!(metrics.increment(counter, 0), Status::BadArgument);
        assert_eq!(metrics.increment(counter, 2), Status::Ok);
        assert_eq!(metrics.record(counter, 3), Status::Ok);
        assert_eq!(metrics.value(counter), Ok(5));
        let gauge = metrics.define(MetricType::Gauge, "g").unwrap();
        assert_eq!(metrics.increment(gauge, -2), Status::Ok);
        assert_eq!(metrics.value(gauge), Ok(-2i64 as u64));
        let histogram = metrics.define(MetricType::Histogram, "h").unwrap();
        assert_eq!(metrics.record(histogram, 7), Status::Ok);
        assert_eq!(metrics.value(histogram), Err(Status::BadArgument));
        let h = metrics.find("h").unwrap().histogram.unwrap();
        assert_eq!((h.count, h.sum), (1, 7.0));
        assert_eq!(h.buckets[2], 0, "7 is above the 5 bound");
        assert_eq!(h.buckets[3], 1, "7 is within the 10 bound");
        assert_eq!(metrics.increment(99, 1), Status::NotFound);
    }
}
