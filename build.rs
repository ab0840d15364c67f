//! Builds the small C++ shim over ATen and links the binary to libtorch (rpath + no-as-needed).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    println!("cargo:rerun-if-changed=csrc/shim_error.h");
    // torch-sys exports the libtorch folder to direct dependents only; that is why
    // torch-sys is a direct dependency of this crate.
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB (is LIBTORCH_USE_PYTORCH=1 set?)"),
    );
    let include = lib.join("..").join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("reg_shim");
    // The CUDA half needs the CUDA runtime headers, which the nvidia-cuda-runtime wheel
    // installed beside torch ships (torch/lib/../../nvidia/cu13/include).
    let cuda_include = lib.join("../../nvidia/cu13/include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/shim_cuda.cpp")
        .include(&include)
        .include(&cuda_include)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("reg_shim_cuda");
    println!("cargo:rerun-if-changed=csrc/shim_cuda.cpp");
    let lib = lib.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // NCCL is dlopen'ed (cudarc) as libnccl.so from the wheel's folder.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}/../../nvidia/nccl/lib");
    // Without --no-as-needed the linker drops libtorch_cuda (no symbol of it is used
    // directly) and CUDA silently disappears at run time.
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-ltorch_cuda");
    println!("cargo:rustc-link-arg=-ltorch_cpu");
    println!("cargo:rustc-link-arg=-lc10");
    println!("cargo:rustc-link-arg=-lc10_cuda");
    // The CUDA runtime of the same wheel (libtorch_cuda loads it anyway): the shim's
    // CUDA events call it directly.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}/../../nvidia/cu13/lib");
    println!("cargo:rustc-link-arg=-L{lib}/../../nvidia/cu13/lib");
    println!("cargo:rustc-link-arg=-l:libcudart.so.13");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
