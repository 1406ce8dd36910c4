import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The outcome of a finished program.
public struct ProgramResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String

    public init(status: Int32, stdout: String, stderr: String) {
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
    }
}

/// A program that could not be started.
public struct ProgramError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Runs a program to completion and returns what it printed. Standard
/// input is /dev/null; `path` is absolute or found on `PATH`.
///
/// Uses posix_spawn and waitpid on threads of its own: Foundation's
/// `Process.waitUntilExit` was seen to miss a child's exit here, and
/// blocking a Dispatch global queue would starve Swift's cooperative pool,
/// which shares those threads on Linux.
public func runProgram(
    _ path: String, _ arguments: [String], environment: [String: String]? = nil
) async throws -> ProgramResult {
    try await withCheckedThrowingContinuation { continuation in
        Thread.detachNewThread {
            continuation.resume(with: Result { try spawnAndWait(path, arguments, environment: environment) })
        }
    }
}

private func spawnAndWait(_ path: String, _ arguments: [String], environment: [String: String]?) throws -> ProgramResult {
    let child = try Child.spawn(path, arguments, environment: environment)
    // Drain both pipes to the end, so a chatty child never blocks on a full one.
    let errorData = Mutex(Data())
    let errorDone = DispatchSemaphore(value: 0)
    Thread.detachNewThread {
        let data = readAll(child.stderr)
        errorData.withLock { $0 = data }
        errorDone.signal()
    }
    let outputData = readAll(child.stdout)
    errorDone.wait()
    close(child.stdout)
    close(child.stderr)
    return ProgramResult(
        status: child.wait(),
        stdout: String(decoding: outputData, as: UTF8.self),
        stderr: String(decoding: errorData.withLock { $0 }, as: UTF8.self))
}

/// A started child: its pid and the read ends of its stdout and stderr.
public struct Child: Sendable {
    public var pid: pid_t
    public var stdout: Int32
    public var stderr: Int32

    public init(pid: pid_t, stdout: Int32, stderr: Int32) {
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
    }

    /// Starts a program with standard input /dev/null and pipes for its
    /// output. A `path` without a slash is looked up on `PATH`.
    public static func spawn(_ path: String, _ arguments: [String], environment: [String: String]? = nil) throws -> Child {
        var outPipe: [Int32] = [0, 0]
        var errPipe: [Int32] = [0, 0]
        // Pipes are made close-on-exec under the same lock that spawns, so no
        // concurrent spawn inherits another command's write end (which would
        // keep that command's output open forever).
        spawnLock.lock()
        defer { spawnLock.unlock() }
        guard pipe(&outPipe) == 0 else { throw ProgramError("pipe failed: errno \(errno)") }
        guard pipe(&errPipe) == 0 else {
            close(outPipe[0])
            close(outPipe[1])
            throw ProgramError("pipe failed: errno \(errno)")
        }
        for descriptor in outPipe + errPipe { _ = fcntl(descriptor, F_SETFD, FD_CLOEXEC) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)

        let env = ProcessInfo.processInfo.environment.merging(environment ?? [:]) { $1 }
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let spawned =
            path.contains("/")
            ? posix_spawn(&pid, path, &actions, nil, argv, envp)
            : posix_spawnp(&pid, path, &actions, nil, argv, envp)
        close(outPipe[1])
        close(errPipe[1])
        guard spawned == 0 else {
            close(outPipe[0])
            close(errPipe[0])
            throw ProgramError("cannot run \(path): \(String(cString: strerror(spawned)))")
        }
        return Child(pid: pid, stdout: outPipe[0], stderr: errPipe[0])
    }

    /// Waits for the child to exit; a death by signal reads as 128 + signal,
    /// as in a shell. Blocking.
    public func wait() -> Int32 {
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    }
}

private let spawnLock = NSLock()

private func readAll(_ descriptor: Int32) -> Data {
    var data = Data()
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = read(descriptor, &buffer, buffer.count)
        if count > 0 {
            data.append(contentsOf: buffer[0..<count])
        } else if count == 0 || errno != EINTR {
            return data
        }
    }
}
