//! Why a command runs on this host instead of the cluster, as data: a
//! [`LocalKind`] that statistics count by and a detail a person reads
//! (sccache's `CannotCache(reason, detail)` is the model). The kind travels
//! typed between the wrapper and the daemon.

use std::fmt;

pub use casbuild_proto::cc::LocalKind;
use casbuild_proto::cc::LocalReason;

/// A command that runs locally, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Local {
    pub kind: LocalKind,
    pub detail: String,
}

impl Local {
    pub fn new(kind: LocalKind, detail: impl Into<String>) -> Self {
        Local { kind, detail: detail.into() }
    }

    /// The wire form.
    pub fn to_proto(&self) -> LocalReason {
        LocalReason { kind: self.kind as i32, detail: self.detail.clone() }
    }

    /// From the wire; an unknown kind (a newer peer) keeps its detail.
    pub fn from_proto(reason: &LocalReason) -> Self {
        let kind = LocalKind::try_from(reason.kind).unwrap_or(LocalKind::Unspecified);
        Local { kind, detail: reason.detail.clone() }
    }
}

impl fmt::Display for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// The name `--show-stats` counts a kind under.
pub fn label(kind: LocalKind) -> &'static str {
    match kind {
        LocalKind::Unspecified => "other",
        LocalKind::NotACompile => "not a compile to an object file",
        LocalKind::SourceFromStdin => "source from stdin",
        LocalKind::NotOneSource => "not exactly one source file",
        LocalKind::NotCOrCxx => "not C or C++",
        LocalKind::MissingValue => "an option without its value",
        LocalKind::OtherToolOption => "options for another tool",
        LocalKind::SideFiles => "files besides the source and the object",
        LocalKind::HostCpu => "depends on this host's CPU",
        LocalKind::UnknownOption => "an option casbuild cc does not send",
        LocalKind::PreprocessingFailed => "preprocessing failed",
        LocalKind::NoDaemon => "no daemon",
        LocalKind::ClusterUnreachable => "cluster unreachable",
        LocalKind::Infrastructure => "infrastructure failure",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_survives_the_wire_and_an_unknown_kind_keeps_its_detail() {
        let local = Local::new(LocalKind::HostCpu, "-march=native depends on this host's CPU");
        assert_eq!(Local::from_proto(&local.to_proto()), local);
        let newer = LocalReason { kind: 999, detail: "a reason from a newer wrapper".into() };
        let read = Local::from_proto(&newer);
        assert_eq!((read.kind, read.to_string().as_str()), (LocalKind::Unspecified, "a reason from a newer wrapper"));
        assert_eq!(label(read.kind), "other");
    }
}
