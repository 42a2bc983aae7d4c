//! Sandboxed execution of REAPI actions over the /cas mount: Linux namespaces,
//! an overlay working tree, limits and output collection. Built by the
//! sandboxed-runner issue on top of `casbuild-fs`.
