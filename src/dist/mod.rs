//! Where this process stands in a data-parallel job: rank, world size, node-local rank.

/// What the launcher (mpirun, srun) tells us through the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchInfo {
    pub rank: i64,
    pub world: i64,
    pub local_rank: i64,
}

fn env_i64(names: &[&str]) -> Option<i64> {
    names.iter().find_map(|n| std::env::var(n).ok()?.parse().ok())
}

impl LaunchInfo {
    /// Reads Open MPI, PMI/PMIx (MPICH, srun) and SLURM variables; a process started
    /// without a launcher is rank 0 of 1.
    pub fn from_env() -> Self {
        let world = env_i64(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"]).unwrap_or(1);
        let rank = env_i64(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"]).unwrap_or(0);
        let local_rank = env_i64(&["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"]).unwrap_or(0);
        LaunchInfo { rank, world, local_rank }
    }

    pub fn single() -> Self {
        LaunchInfo { rank: 0, world: 1, local_rank: 0 }
    }
}
