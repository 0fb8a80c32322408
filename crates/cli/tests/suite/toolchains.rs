//! Real projects built and tested inside `agentfense run`, one per toolchain (issue 16): what
//! a user does first. Each runs under the `development` preset, the toolchain from the host's
//! `/usr` (what a sandbox sees), with no network.

use std::path::Path;
use std::process::Command;

use super::util::{outcome, write_tree};

/// A project directory and a data directory, when the privileged tests and `tools` (in
/// `/usr/bin`, where the sandbox finds them) are here.
fn project(test: &str, tools: &[&str]) -> Option<(tempfile::TempDir, tempfile::TempDir)> {
    let missing: Vec<Option<String>> = tools
        .iter()
        .map(|t| {
            let p = Path::new("/usr/bin").join(t);
            (!p.exists()).then(|| format!("{} (./dev setup installs it)", p.display()))
        })
        .chain([agentfense_testsupport::privileged()])
        .collect();
    agentfense_testsupport::require(test, agentfense_testsupport::all(&missing))
        .then(|| (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()))
}

/// `agentfense run --preset development --discard DIR -- CMD`: (exit code, stdout, stderr).
fn run(project: &Path, data: &Path, cmd: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentfense"))
        .arg("run")
        .arg("--data-dir")
        .arg(data)
        .arg("--preset")
        .arg("development")
        .arg("--discard")
        .arg(project)
        .args(["--", cmd])
        .output()
        .unwrap();
    outcome(out)
}

#[test]
fn a_c_project_builds_and_tests_with_make() {
    let Some((p, data)) = project("a_c_project_builds_and_tests_with_make", &["make", "cc"]) else {
        return;
    };
    write_tree(
        p.path(),
        &[
            (
                "Makefile",
                "CFLAGS = -O2 -Wall -Werror\n\
                 all: hello\n\
                 hello: hello.o greet.o\n\t$(CC) -o $@ $^\n\
                 test: hello\n\t./hello | grep -q 'hello from c' && echo PASS\n",
            ),
            ("greet.h", "const char *greeting(void);\n"),
            (
                "greet.c",
                "#include \"greet.h\"\nconst char *greeting(void) { return \"hello from c\"; }\n",
            ),
            (
                "hello.c",
                "#include <stdio.h>\n#include \"greet.h\"\nint main(void) { puts(greeting()); return 0; }\n",
            ),
            (".env", "SECRET=1\n"),
        ],
    );
    let (code, out, err) = run(
        p.path(),
        data.path(),
        "make -s test && make -s test && test ! -e .env",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out, "PASS\nPASS\n", "{err}");
}

#[test]
fn a_python_project_tests_with_pytest_in_a_venv() {
    let Some((p, data)) = project("a_python_project_tests_with_pytest_in_a_venv", &["python3"])
    else {
        return;
    };
    if !agentfense_testsupport::require(
        "a_python_project_tests_with_pytest_in_a_venv",
        agentfense_testsupport::python_modules("/usr/bin/python3", &["pytest", "venv"])
            .map(|m| format!("{m} (./dev setup installs python3-pytest)")),
    ) {
        return;
    }
    write_tree(
        p.path(),
        &[
            ("calc/__init__.py", "def add(a, b):\n    return a + b\n"),
            (
                "tests/test_calc.py",
                "from calc import add\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\
                 def test_strings():\n    assert add('a', 'b') == 'ab'\n",
            ),
            (
                "pyproject.toml",
                "[tool.pytest.ini_options]\npythonpath = [\".\"]\n",
            ),
        ],
    );
    let (code, out, err) = run(
        p.path(),
        data.path(),
        "python3 -m venv --system-site-packages .venv && .venv/bin/python -m pytest -q -p no:cacheprovider",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("2 passed"), "{out}\n{err}");
}

#[test]
fn a_rust_crate_tests_with_cargo() {
    let Some((p, data)) = project("a_rust_crate_tests_with_cargo", &["cargo", "rustc"]) else {
        return;
    };
    write_tree(
        p.path(),
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"sample\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            (
                "src/lib.rs",
                "pub fn double(x: u32) -> u32 { x * 2 }\n\n#[cfg(test)]\nmod tests {\n    \
                 #[test]\n    fn doubles() { assert_eq!(super::double(21), 42); }\n}\n",
            ),
        ],
    );
    let (code, out, err) = run(p.path(), data.path(), "cargo test --offline -q 2>&1");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("test result: ok. 1 passed"), "{out}\n{err}");
}

#[test]
fn a_node_project_installs_a_local_tarball_and_tests_with_npm() {
    let Some((p, data)) = project(
        "a_node_project_installs_a_local_tarball_and_tests_with_npm",
        &["node", "npm"],
    ) else {
        return;
    };
    // The dependency as npm packs it: a gzipped tar with everything under `package/`.
    let dep = tempfile::tempdir().unwrap();
    write_tree(
        dep.path(),
        &[
            (
                "package/package.json",
                "{\"name\": \"pad-local\", \"version\": \"1.0.0\", \"main\": \"index.js\"}\n",
            ),
            (
                "package/index.js",
                "module.exports = (s, n) => ' '.repeat(Math.max(0, n - s.length)) + s;\n",
            ),
        ],
    );
    let packed = Command::new("tar")
        .arg("czf")
        .arg(p.path().join("pad-local-1.0.0.tgz"))
        .arg("-C")
        .arg(dep.path())
        .arg("package")
        .status()
        .unwrap();
    assert!(packed.success());
    write_tree(
        p.path(),
        &[
            (
                "package.json",
                "{\"name\": \"app\", \"version\": \"1.0.0\", \"private\": true, \
                 \"scripts\": {\"test\": \"node test.js\"}}\n",
            ),
            (
                "test.js",
                "const pad = require('pad-local');\nconst assert = require('assert');\n\
                 assert.strictEqual(pad('7', 3), '  7');\nconsole.log('PASS');\n",
            ),
        ],
    );
    let (code, out, err) = run(
        p.path(),
        data.path(),
        "npm install --offline --no-audit --no-fund --loglevel=error ./pad-local-1.0.0.tgz \
         && npm test --silent",
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.ends_with("PASS\n"), "{out}\n{err}");
}
