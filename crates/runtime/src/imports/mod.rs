//! Everything a Proxy-Wasm module may import, and the check that runs before linking so a module
//! that wants something no host defines is refused with the names of what it wants.

pub(crate) mod proxy;
pub(crate) mod wasi;

use wasmtime::{Engine, ExternType, FuncType, Linker, Module};

use crate::error::LoadError;
use crate::state::VmState;

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
