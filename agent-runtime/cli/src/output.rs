//! Output and exit codes shared by every command.
//!
//! `-o table` (the default) prints for people; `-o json` prints one JSON object, or
//! an array for lists, with the field names of the controller's API (stable).
//!
//! | exit | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | internal error (a bug or corrupt state) |
//! | 2 | usage: bad arguments or input |
//! | 3 | not found |
//! | 4 | already exists |
//! | 5 | refused: not allowed in this state, or for this admin |
//! | 6 | unavailable: no server or controller reachable, or concurrent changes kept winning (an outage or contention, not your input): retry |

use clap::ValueEnum;
use serde::Serialize;

use agentbus_control::api::{ApiError, ErrorCode};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Aligned text for people.
    #[default]
    Table,
    /// JSON: one object, or an array for lists.
    Json,
    /// CSV with a header line (`audit list`, `usage`; other commands print JSON).
    Csv,
}

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for an internal error.
pub const EXIT_INTERNAL: i32 = 1;
/// Exit code for bad usage or input.
pub const EXIT_USAGE: i32 = 2;
/// Exit code for not found.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code for already exists.
pub const EXIT_EXISTS: i32 = 4;
/// Exit code for refused or forbidden.
pub const EXIT_REFUSED: i32 = 5;
/// Exit code for unavailable.
pub const EXIT_UNAVAILABLE: i32 = 6;

/// The exit code of an API error.
pub fn exit_code(code: ErrorCode) -> i32 {
    match code {
        ErrorCode::InvalidInput => EXIT_USAGE,
        ErrorCode::NotFound => EXIT_NOT_FOUND,
        ErrorCode::AlreadyExists => EXIT_EXISTS,
        ErrorCode::Refused | ErrorCode::Forbidden | ErrorCode::BudgetExceeded => EXIT_REFUSED,
        // Both are transient: retrying the same command is the remedy.
        ErrorCode::Unavailable | ErrorCode::Conflict => EXIT_UNAVAILABLE,
        _ => EXIT_INTERNAL,
    }
}

/// A failed command: one line and its exit code.
#[derive(Debug)]
pub struct Failure {
    /// The line for stderr.
    pub message: String,
    /// The exit code.
    pub code: i32,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure {
            message: agentbus_control::one_line(&e.message),
            code: exit_code(e.code),
        }
    }
}

impl From<crate::CliError> for Failure {
    fn from(e: crate::CliError) -> Self {
        Failure {
            message: e.0,
            code: EXIT_INTERNAL,
        }
    }
}

impl From<agentbus_control::ControlError> for Failure {
    fn from(e: agentbus_control::ControlError) -> Self {
        use agentbus_control::ControlErrorKind as K;
        let code = match e.kind() {
            K::NotInitialized => EXIT_NOT_FOUND,
            K::InvalidUrl | K::InvalidId | K::InvalidReplicas => EXIT_USAGE,
            K::Connect => EXIT_UNAVAILABLE,
            _ => EXIT_INTERNAL,
        };
        Failure {
            message: agentbus_control::one_line(&e.to_string()),
            code,
        }
    }
}

/// A failure with exit `code`, its message kept to one line.
pub fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure {
        message: agentbus_control::one_line(&message.into()),
        code,
    }
}

/// A usage failure (exit 2).
pub fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        code: EXIT_USAGE,
    }
}

/// Prints `value` as JSON, or `table` for people.
pub fn print<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> String,
) -> Result<(), Failure> {
    let text = match output {
        Output::Json | Output::Csv => serde_json::to_string_pretty(value).map_err(|e| Failure {
            message: format!("encoding JSON: {e}"),
            code: EXIT_INTERNAL,
        })?,
        Output::Table => table(),
    };
    crate::write_stdout(&text);
    Ok(())
}
