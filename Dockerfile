# reg-ddp on an NVIDIA CUDA base: a thin mirror of launch/setup.sh (the source of truth
# for what the project needs), then a release build. Not buildable on the development
# machines (no Docker engine there); kept in step with launch/setup.sh by hand.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential pkg-config libclang-dev clang openmpi-bin libopenmpi-dev cmake nasm \
        python3 python3-venv ca-certificates curl git \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH

WORKDIR /opt/reg-ddp
COPY . .
RUN ./launch/setup.sh && . launch/env.sh && cargo build --release \
    && ln -s /opt/reg-ddp/target/release/reg-ddp /usr/local/bin/reg-ddp

ENV OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ENTRYPOINT ["mpirun"]
CMD ["-np", "1", "reg-ddp", "train", "--config", "configs/demo.yaml"]
