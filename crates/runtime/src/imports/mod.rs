//! Everything a Proxy-Wasm module may import, and the check that runs before linking so a module
//! that wants something no host defines is refused with the names of what it wants.

pub(crate) mod proxy;
pub(crate) mod wasi;

use wasmtime::{Engine, ExternType, FuncType, Linker, Module, ValType};

use crate::error::LoadError;
use crate::state::VmState;

/// Every function the host defines, as (import module, name): the `env.proxy_*` functions, for
/// every ABI version, and the whole of WASI preview1 under both `wasi_snapshot_preview1` and
/// `wasi_unstable` (most of it as stubs, see [`is_wasi_stub`]). Built from the tables the import
/// check below reads, so tools can tell before loading whether a module links (`wasmgate plugin
/// inspect`) and the fuzzer reaches every function there is.
pub fn host_functions() -> impl Iterator<Item = (&'static str, &'static str)> {
    let env = proxy::NAMES.iter().map(|name| ("env", *name));
    let wasi = wasi::MODULES.into_iter().flat_map(|module| {
        wasi::IMPLEMENTED
            .iter()
            .copied()
            .chain(wasi::STUBS.iter().map(|(name, _)| *name))
            .map(move |name| (module, name))
    });
    env.chain(wasi)
}

/// Whether the WASI function `name` links but only answers a fixed errno (BADF: there are no
/// descriptors; NOSYS), so a plugin that relies on it gets an error rather than a service.
pub fn is_wasi_stub(name: &str) -> bool {
    wasi::STUBS.iter().any(|(stub, _)| *stub == name)
}

pub(crate) fn linker_for(engine: &Engine, module: &Module) -> Result<Linker<VmState>, LoadError> {
    let mut unknown = Vec::new();
    let mut functions: Vec<(String, String, FuncType)> = Vec::new();
    for import in module.imports() {
        let name = format!("{}.{}", import.module(), import.name());
        let ty = match import.ty() {
            ExternType::Func(ty) => ty,
            ExternType::Memory(_) => {
                return Err(LoadError::UnsupportedImport {
                    kind: "a memory",
                    name,
                });
            }
            ExternType::Table(_) => {
                return Err(LoadError::UnsupportedImport {
                    kind: "a table",
                    name,
                });
            }
            ExternType::Global(_) => {
                return Err(LoadError::UnsupportedImport {
                    kind: "a global",
                    name,
                });
            }
            _ => {
                return Err(LoadError::UnsupportedImport {
                    kind: "a non-function item",
                    name,
                });
            }
        };
        let known = match import.module() {
            "env" => proxy::NAMES.contains(&import.name()),
            module if wasi::MODULES.contains(&module) => wasi::defines(import.name()),
            _ => false,
        };
        if !known {
            unknown.push(name);
        } else if let Some(expected) = expected_signature(import.module(), import.name(), &ty)
            && expected != signature(&ty)
        {
            return Err(LoadError::ImportTypeMismatch {
                name,
                found: describe(&signature(&ty)),
                expected: describe(&expected),
            });
        }
        functions.push((import.module().to_owned(), import.name().to_owned(), ty));
    }
    if !unknown.is_empty() {
        return Err(LoadError::UnknownImports(unknown));
    }
    let void_legacy: Vec<&str> = functions
        .iter()
        .filter(|(module, name, ty)| {
            module == "env"
                && proxy::VOID_OR_STATUS.contains(&name.as_str())
                && ty.results().len() == 0
        })
        .map(|(_, name, _)| name.as_str())
        .collect();
    let mut linker = Linker::new(engine);
    proxy::add_to_linker(&mut linker, &void_legacy)
        .map_err(|e| LoadError::Link(format!("{e:#}")))?;
    wasi::add_to_linker(&mut linker, &functions).map_err(|e| LoadError::Link(format!("{e:#}")))?;
    Ok(linker)
}

/// A function type as parameter and result letters: `i` for i32, `I` for i64, `?` otherwise.
fn signature(ty: &FuncType) -> (String, String) {
    let letters = |types: &mut dyn Iterator<Item = ValType>| -> String {
        types
            .map(|t| match t {
                ValType::I32 => 'i',
                ValType::I64 => 'I',
                _ => '?',
            })
            .collect()
    };
    (letters(&mut ty.params()), letters(&mut ty.results()))
}

fn describe((params, results): &(String, String)) -> String {
    let names = |letters: &str| {
        letters
            .chars()
            .map(|c| match c {
                'i' => "i32",
                'I' => "i64",
                _ => "other",
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!("({}) -> ({})", names(params), names(results))
}

/// The type the host defines for an import; `None` where either of two forms is accepted and
/// the linker picks the right one.
fn expected_signature(module: &str, name: &str, ty: &FuncType) -> Option<(String, String)> {
    let (params, results) = if module == "env" {
        if proxy::VOID_OR_STATUS.contains(&name) {
            return None;
        }
        proxy::signature(name)?
    } else {
        match wasi::signature(name) {
            Some(signature) => signature,
            // Stubs take the module's own parameters, but must answer with nothing or an errno.
            None => {
                let (params, results) = signature(ty);
                return Some((
                    params,
                    if results.is_empty() {
                        String::new()
                    } else {
                        "i".into()
                    },
                ));
            }
        }
    };
    Some((params.into(), results.into()))
}
