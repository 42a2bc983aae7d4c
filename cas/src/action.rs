//! Building a REAPI Action from a command line: the Command and Action protos
//! encoded the canonical way (environment sorted by name, output paths sorted
//! and unique, platform properties sorted), so equal commands get equal
//! digests whoever builds them.

use std::collections::BTreeMap;

use bytes::Bytes;
use casbuild_proto::reapi::command::EnvironmentVariable;
use casbuild_proto::reapi::{platform, Action, Command, Platform};
use prost::Message;

use crate::digest::{Digest, DigestFunction};

/// What an Action runs, over which input root.
#[derive(Clone, Debug, Default)]
pub struct ActionSpec {
    /// The command line.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: BTreeMap<String, String>,
    /// Output paths, relative to the working directory.
    pub outputs: Vec<String>,
    /// The input root Directory [default: the empty one, whose encoding is empty].
    pub input_root: Option<Digest>,
    /// Seconds the action may run.
    pub timeout_secs: Option<u64>,
    /// Properties a worker must have.
    pub platform: BTreeMap<String, String>,
}

/// An encoded Action: its digest and the Command and Action blobs.
#[derive(Clone, Debug)]
pub struct EncodedAction {
    /// The Action's digest, the key of its result in the action cache.
    pub digest: Digest,
    /// The Command and the Action blobs, to store in the CAS.
    pub blobs: Vec<(Digest, Bytes)>,
}

impl ActionSpec {
    /// Encodes the Command and Action with `function`.
    pub fn encode(&self, function: DigestFunction) -> EncodedAction {
        let environment_variables = self
            .env
            .iter()
            .map(|(name, value)| EnvironmentVariable { name: name.clone(), value: value.clone() })
            .collect();
        let mut output_paths = self.outputs.clone();
        output_paths.sort();
        output_paths.dedup();
        let properties: Vec<platform::Property> = self
            .platform
            .iter()
            .map(|(name, value)| platform::Property { name: name.clone(), value: value.clone() })
            .collect();
        let command =
            Command { arguments: self.argv.clone(), environment_variables, output_paths, ..Default::default() };
        let command_bytes = Bytes::from(command.encode_to_vec());
        let command_digest = function.digest_of(&command_bytes);
        let action = Action {
            command_digest: Some(command_digest.to_proto()),
            input_root_digest: Some(self.input_root.unwrap_or_else(|| function.empty()).to_proto()),
            timeout: self.timeout_secs.map(|s| casbuild_proto::protobuf::Duration { seconds: s as i64, nanos: 0 }),
            platform: (!properties.is_empty()).then_some(Platform { properties }),
            ..Default::default()
        };
        let action_bytes = Bytes::from(action.encode_to_vec());
        let digest = function.digest_of(&action_bytes);
        EncodedAction { digest, blobs: vec![(command_digest, command_bytes), (digest, action_bytes)] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_commands_get_equal_digests_whatever_the_order_given() {
        let spec = |env: &[(&str, &str)], outputs: &[&str]| ActionSpec {
            argv: vec!["cc".into(), "-c".into(), "a.c".into()],
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let a = spec(&[("PATH", "/bin"), ("LANG", "C")], &["b.o", "a.o"]).encode(DigestFunction::Sha256);
        let b = spec(&[("LANG", "C"), ("PATH", "/bin")], &["a.o", "b.o", "a.o"]).encode(DigestFunction::Sha256);
        assert_eq!(a.digest, b.digest);
        let command = Command::decode(a.blobs[0].1.as_ref()).unwrap();
        assert_eq!(command.output_paths, ["a.o", "b.o"]);
        assert_eq!(command.environment_variables[0].name, "LANG");
        let c = spec(&[("PATH", "/bin")], &["a.o"]).encode(DigestFunction::Sha256);
        assert_ne!(a.digest, c.digest);
    }
}
