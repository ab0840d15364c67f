//! The NCCL backend on one GPU, as a communicator of one rank: libnccl is found and loaded,
//! the communicator is made from an id broadcast over MPI, and every collective runs on
//! libtorch's stream with each dtype the trainer and evaluator send. With one rank every
//! collective is the identity, so this checks the plumbing (pointers, counts, dtypes,
//! streams); the arithmetic across ranks needs a machine with several GPUs.

use reg::dist::mpi_comm::MpiComm;
use reg::dist::nccl_comm::NcclComm;
use reg::dist::{agree, Comm};
use tch::{Device, Kind, Tensor};

#[test]
#[ignore = "needs a CUDA device and libnccl: cargo test --release --test nccl -- --ignored on a GPU machine"]
fn one_rank_nccl_collectives_run_on_the_gpu() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    let gpu = Device::Cuda(0);
    let comm = NcclComm::init(MpiComm::init().unwrap(), gpu).unwrap();
    assert_eq!((comm.rank(), comm.world(), comm.device()), (0, 1, gpu));
    for kind in [Kind::Float, Kind::BFloat16, Kind::Double, Kind::Int64, Kind::Uint8] {
        let x = Tensor::arange(1000, (Kind::Float, gpu)).remainder(200).to_kind(kind);
        let t = x.copy();
        comm.all_reduce_sum(&t).unwrap();
        comm.broadcast(&t, 0).unwrap();
        let out = x.zeros_like();
        comm.reduce_scatter_sum(&t, &out).unwrap();
        let gathered = x.zeros_like();
        comm.all_gather(&out, &gathered).unwrap();
        comm.barrier().unwrap();
        assert!(gathered.equal(&x), "{kind:?}: collectives changed the values");
    }
    // What the trainer and the evaluator send through it.
    assert_eq!(agree(&comm, &[1.5, -2.0]).unwrap(), vec![1.5, -2.0]);
    // A CPU tensor is refused with a message, not passed to NCCL.
    let e = comm.all_reduce_sum(&Tensor::zeros([4], (Kind::Float, Device::Cpu))).unwrap_err();
    assert!(format!("{e}").contains("cuda:0"), "{e}");
}
