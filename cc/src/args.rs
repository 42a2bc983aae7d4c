//! Reading a compiler command line: is it one compile the cluster can do, and
//! which of its arguments belong to preprocessing (done here) and which to
//! compiling (done remotely)?
//!
//! Only arguments understood here go remote; anything unknown keeps the whole
//! command local, so a flag we misjudge can never change an object file.

/// The language of the single source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    C,
    Cxx,
}

impl Language {
    /// The `-x` name of this language once preprocessed.
    pub fn preprocessed(self) -> &'static str {
        match self {
            Language::C => "cpp-output",
            Language::Cxx => "c++-cpp-output",
        }
    }
}

/// A compile the cluster can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compile {
    /// The source file, as given.
    pub source: String,
    pub language: Language,
    /// The object file: `-o`, or the source's base name with `.o`.
    pub output: String,
    /// Arguments for `COMPILER ... -E` (everything but `-c`, `-o` and the
    /// source), dependency-file flags included.
    pub preprocess: Vec<String>,
    /// Arguments that shape code generation, for the remote compile.
    pub compile: Vec<String>,
    /// Whether a dependency file is asked for (`-MD`/`-MMD`).
    pub depfile: bool,
    /// Whether `-MF`, `-MT` or `-MQ` were given.
    pub depfile_named: bool,
    pub target_named: bool,
}

pub use crate::reason::Local;
use crate::reason::LocalKind;

/// Preprocessor options followed by a separate value (`-I dir`) or glued (`-Idir`).
const PREPROCESSOR_WITH_VALUE: &[&str] =
    &["-I", "-D", "-U", "-include", "-imacros", "-isystem", "-iquote", "-idirafter", "-isysroot", "-MF", "-MT", "-MQ"];
/// Dependency-file flags without a value.
const DEPFILE_FLAGS: &[&str] = &["-MD", "-MMD", "-MP"];
/// Flags that read or write files besides the source and the object (split
/// DWARF, profiles, coverage notes, dumps, sanitizer lists, plugins, path
/// remapping), by prefix: they stay local, since the worker would lose those
/// files or lack them.
const SIDE_FILE_PREFIXES: &[&str] = &[
    "-gsplit-dwarf",
    "-fprofile",
    "-fauto-profile",
    "-ftest-coverage",
    "-fcoverage",
    "-fbranch-probabilities",
    "-fsanitize-ignorelist",
    "-fsanitize-blacklist",
    "-fsanitize-coverage-allowlist",
    "-fsanitize-coverage-ignorelist",
    "-fstack-usage",
    "-fcallgraph-info",
    "-fdump-",
    "-fopt-info",
    "-fplugin",
    "-fdebug-prefix-map",
    "-ffile-prefix-map",
    "-fmacro-prefix-map",
    "-fprofile-prefix-map",
    "-save-temps",
    "--coverage",
];
/// Flags that affect code generation and are safe to send, by prefix.
const COMPILE_PREFIXES: &[&str] = &["-O", "-g", "-f", "-m", "-W", "-pedantic", "-w", "-pipe", "-pthread"];

/// Classifies `args` (without the compiler itself).
pub fn classify(args: &[String]) -> Result<Compile, Local> {
    let mut compile_only = false;
    let mut sources = Vec::new();
    let mut output = None;
    let mut preprocess = Vec::new();
    let mut compile = Vec::new();
    let (mut depfile, mut depfile_named, mut target_named) = (false, false, false);
    let mut language_flag = None;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let next = || {
            args.get(i + 1).cloned().ok_or_else(|| Local::new(LocalKind::MissingValue, format!("{arg} needs a value")))
        };
        match arg {
            "-c" => compile_only = true,
            "-o" => {
                output = Some(next()?);
                i += 1;
            }
            "-E" | "-S" | "-M" | "-MM" => {
                return Err(Local::new(LocalKind::NotACompile, format!("{arg} is not a compile to an object file")))
            }
            "-" => return Err(Local::new(LocalKind::SourceFromStdin, "the source comes from stdin")),
            "-x" => {
                if !sources.is_empty() {
                    // It would apply to files after it only; keep it simple.
                    return Err(Local::new(LocalKind::NotCOrCxx, "-x after the source file"));
                }
                let value = next()?;
                preprocess.extend(["-x".to_owned(), value.clone()]);
                language_flag = Some(value);
                i += 1;
            }
            _ if DEPFILE_FLAGS.contains(&arg) => {
                depfile |= arg != "-MP";
                preprocess.push(arg.to_owned());
            }
            _ if PREPROCESSOR_WITH_VALUE.contains(&arg) => {
                let value = next()?;
                depfile_named |= arg == "-MF";
                target_named |= arg == "-MT" || arg == "-MQ";
                preprocess.extend([arg.to_owned(), value]);
                i += 1;
            }
            _ if PREPROCESSOR_WITH_VALUE.iter().any(|p| p.len() == 2 && arg.starts_with(p)) => {
                preprocess.push(arg.to_owned());
            }
            _ if arg.starts_with("-std=") || arg == "-ansi" => {
                // The language standard shapes both phases.
                preprocess.push(arg.to_owned());
                compile.push(arg.to_owned());
            }
            _ if arg.starts_with("-Wp,") || arg.starts_with("-Wl,") || arg.starts_with("-Wa,") => {
                return Err(Local::new(LocalKind::OtherToolOption, format!("{arg} passes options to another tool")));
            }
            _ if SIDE_FILE_PREFIXES.iter().any(|p| arg.starts_with(p)) => {
                let detail = format!("{arg} reads or writes files besides the source and the object");
                return Err(Local::new(LocalKind::SideFiles, detail));
            }
            _ if arg.starts_with("-march=native") || arg.starts_with("-mtune=native") || arg == "-mcpu=native" => {
                return Err(Local::new(LocalKind::HostCpu, format!("{arg} depends on this host's CPU")));
            }
            _ if COMPILE_PREFIXES.iter().any(|p| arg.starts_with(p)) => {
                // Both phases see these: macros like __OPTIMIZE__ follow -O.
                preprocess.push(arg.to_owned());
                compile.push(arg.to_owned());
            }
            _ if arg.starts_with('-') => {
                let detail = format!("{arg} is not an option casbuild cc sends remotely");
                return Err(Local::new(LocalKind::UnknownOption, detail));
            }
            _ => sources.push(arg.to_owned()),
        }
        i += 1;
    }
    if !compile_only {
        return Err(Local::new(LocalKind::NotACompile, "no -c: this links or does something other than compile"));
    }
    let source = match sources.as_slice() {
        [one] => one.clone(),
        [] => return Err(Local::new(LocalKind::NotOneSource, "no source file")),
        _ => return Err(Local::new(LocalKind::NotOneSource, format!("{} source files in one command", sources.len()))),
    };
    let language = match language_flag.as_deref() {
        Some("c") => Language::C,
        Some("c++") => Language::Cxx,
        Some(other) => return Err(Local::new(LocalKind::NotCOrCxx, format!("-x {other} is not C or C++"))),
        None => language_of(&source)
            .ok_or_else(|| Local::new(LocalKind::NotCOrCxx, format!("{source} is not a C or C++ source")))?,
    };
    let output = output.unwrap_or_else(|| {
        let base = std::path::Path::new(&source).file_stem().map(|s| s.to_string_lossy().into_owned());
        format!("{}.o", base.unwrap_or_default())
    });
    Ok(Compile { source, language, output, preprocess, compile, depfile, depfile_named, target_named })
}

fn language_of(source: &str) -> Option<Language> {
    let extension = std::path::Path::new(source).extension()?.to_str()?;
    match extension {
        "c" => Some(Language::C),
        "cc" | "cpp" | "cxx" | "c++" | "C" | "cp" | "CPP" => Some(Language::Cxx),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_plain_compile_splits_into_preprocess_and_compile_flags() {
        let c = classify(&args("-O2 -g -Iinclude -DNDEBUG -Wall -c lib/x.c -o obj/x.o -MD -MF obj/x.d")).unwrap();
        assert_eq!(c.source, "lib/x.c");
        assert_eq!(c.output, "obj/x.o");
        assert_eq!(c.language, Language::C);
        assert_eq!(c.compile, ["-O2", "-g", "-Wall"]);
        assert_eq!(c.preprocess, ["-O2", "-g", "-Iinclude", "-DNDEBUG", "-Wall", "-MD", "-MF", "obj/x.d"]);
        assert!(c.depfile && c.depfile_named && !c.target_named);
        let c = classify(&args("-c y.cpp -I inc -std=c++17")).unwrap();
        assert_eq!((c.output.as_str(), c.language), ("y.o", Language::Cxx));
        assert_eq!(c.preprocess, ["-I", "inc", "-std=c++17"]);
        assert_eq!(c.compile, ["-std=c++17"]);
    }

    #[test]
    fn everything_else_stays_local_with_a_kind_and_a_reason() {
        use LocalKind::*;
        for (line, kind, why) in [
            ("x.o y.o -o app", NotACompile, "no -c"),
            ("-E x.c", NotACompile, "-E is not a compile"),
            ("-M x.c", NotACompile, "-M is not a compile"),
            ("-c a.c b.c", NotOneSource, "2 source files"),
            ("-c -", SourceFromStdin, "stdin"),
            ("-c x.c --frobnicate", UnknownOption, "--frobnicate is not an option"),
            ("-c x.s", NotCOrCxx, "not a C or C++ source"),
            ("-c x.c -march=native", HostCpu, "this host's CPU"),
            ("-c x.c -Wl,-z,now", OtherToolOption, "-Wl,-z,now passes options"),
            ("-c x.c -ffile-prefix-map=/a=/b", SideFiles, "files besides"),
            ("-c x.c -gsplit-dwarf", SideFiles, "files besides"),
            ("-c x.c -fprofile-use=x.gcda", SideFiles, "files besides"),
            ("-c x.c --coverage", SideFiles, "files besides"),
            ("-c x.c -x c++", NotCOrCxx, "-x after the source"),
            ("-c x.c -o", MissingValue, "-o needs a value"),
        ] {
            let e = classify(&args(line)).unwrap_err();
            assert_eq!(e.kind, kind, "{line}: {e}");
            assert!(e.detail.contains(why), "{line}: {e}");
        }
    }
}
