//! The NCCL backend on GPUs: libnccl is found and loaded, the communicator is made from
//! an id broadcast over MPI, and every collective runs on libtorch's stream with each
//! dtype the trainer and evaluator send, exactly, on however many ranks `mpirun`
//! starts (one alone checks the plumbing; `tests/gpu_nccl.sh` runs 2 and 4 ranks on
//! one GPU, each declaring its own host through `NCCL_HOSTID`).

use reg::dist::mpi_comm::MpiComm;
use reg::dist::nccl_comm::NcclComm;
use reg::dist::{agree, Comm, LaunchInfo};
use tch::{Device, Kind, Tensor};

#[test]
#[ignore = "needs a CUDA device and libnccl: cargo test --release --test nccl -- --ignored on a GPU machine (tests/gpu_nccl.sh for several ranks)"]
fn nccl_collectives_are_exact_on_every_rank() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    let mpi = MpiComm::init().unwrap();
    let gpu = LaunchInfo::from_env().local_device(Device::Cuda(0));
    let comm = NcclComm::init(mpi, gpu).unwrap();
    let (rank, world) = (comm.rank(), comm.world());
    assert_eq!(comm.device(), gpu);
    // Small integers: every sum below is exact in each dtype, bf16 and u8 included.
    let n = 24 * world;
    let base = Tensor::arange(n, (Kind::Float, gpu)).remainder(7);
    let mine = &base + rank as f64;
    let total = &base * world as f64 + (world * (world - 1) / 2) as f64;
    for kind in [Kind::Float, Kind::BFloat16, Kind::Double, Kind::Int64, Kind::Uint8] {
        let t = mine.to_kind(kind);
        comm.all_reduce_sum(&t).unwrap();
        assert!(t.equal(&total.to_kind(kind)), "{kind:?}: all-reduce on rank {rank}");

        let out = Tensor::zeros([n / world], (kind, gpu));
        comm.reduce_scatter_sum(&mine.to_kind(kind), &out).unwrap();
        assert!(out.equal(&total.to_kind(kind).chunk(world, 0)[rank as usize]), "{kind:?}: reduce-scatter on rank {rank}");

        let gathered = Tensor::zeros([n * world], (kind, gpu));
        comm.all_gather(&mine.to_kind(kind), &gathered).unwrap();
        for (r, part) in gathered.chunk(world, 0).iter().enumerate() {
            assert!(part.equal(&(&base + r as f64).to_kind(kind)), "{kind:?}: all-gather part {r} on rank {rank}");
        }

        let root = world - 1;
        let b = mine.to_kind(kind);
        comm.broadcast(&b, root).unwrap();
        assert!(b.equal(&(&base + root as f64).to_kind(kind)), "{kind:?}: broadcast from {root} on rank {rank}");
        comm.barrier().unwrap();
    }
    // What the trainer and the evaluator send through it.
    let sum = agree(&comm, &[1.5, -(rank as f64)]).unwrap();
    assert_eq!(sum, vec![1.5 * world as f64, -((world * (world - 1) / 2) as f64)]);
    // A CPU tensor is refused with a message, not passed to NCCL.
    let e = comm.all_reduce_sum(&Tensor::zeros([4], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(format!("{e}").contains("cuda:"), "{e}");
    // Nothing failed asynchronously on the way.
    assert_eq!(comm.guard().expect("NCCL has a guard").async_error(), None);
}
