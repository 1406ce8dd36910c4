import Foundation
@_exported import Support

/// The outcome of a finished process.
public typealias CommandResult = ProgramResult

/// Runs a program to completion and returns what it printed. Standard
/// input is /dev/null.
public func runCommand(
    _ executable: URL, _ arguments: [String], environment: [String: String]? = nil
) async throws -> CommandResult {
    try await runProgram(executable.path, arguments, environment: environment)
}

/// Runs `corral` with arguments.
public func runCorral(_ arguments: [String], environment: [String: String]? = nil) async throws -> CommandResult {
    try await runCommand(Paths.corralBinary, arguments, environment: environment)
}

/// A failure of test set-up, with what to do about it.
public struct SetupError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
