import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A long-running program (a server) started for a test: its output is
/// collected as it comes, and it is stopped with SIGTERM.
public final class BackgroundProcess: Sendable {
    public let pid: pid_t

    private final class Text: Sendable {
        let value = Mutex("")

        /// Appends what `descriptor` delivers, on a thread of its own, until EOF.
        func collect(_ descriptor: Int32) {
            Thread.detachNewThread { [self] in
                var buffer = [UInt8](repeating: 0, count: 4096)
                while true {
                    let count = read(descriptor, &buffer, buffer.count)
                    if count > 0 {
                        let chunk = String(decoding: buffer[0..<count], as: UTF8.self)
                        value.withLock { $0 += chunk }
                    } else if count == 0 || errno != EINTR {
                        break
                    }
                }
                close(descriptor)
            }
        }
    }

    private let output = Text()
    private let errors = Text()

    /// Starts `executable` with `arguments`, standard input /dev/null.
    public init(_ executable: URL, _ arguments: [String], environment: [String: String]? = nil) throws {
        let child = try Child.spawn(executable.path, arguments, environment: environment)
        pid = child.pid
        output.collect(child.stdout)
        errors.collect(child.stderr)
    }

    public var stdout: String { output.value.withLock { $0 } }
    public var stderr: String { errors.value.withLock { $0 } }

    /// Waits until standard output has a line containing `text`; returns it.
    public func line(containing text: String, timeout: Duration) async throws -> String {
        try await line(containing: text, in: { self.stdout }, timeout: timeout)
    }

    /// Waits until standard error has a line containing `text`; returns it.
    public func line(inStderrContaining text: String, timeout: Duration) async throws -> String {
        try await line(containing: text, in: { self.stderr }, timeout: timeout)
    }

    private func line(containing text: String, in output: () -> String, timeout: Duration) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let line = output().split(separator: "\n").first(where: { $0.contains(text) }) { return String(line) }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw SetupError("no line with '\(text)' within \(timeout). stdout:\n\(stdout.suffix(4000))\nstderr:\n\(stderr.suffix(4000))")
    }

    private let exited = Mutex(false)

    /// Sends `signal` (SIGTERM unless told) and waits for the exit; returns
    /// the exit status.
    public func terminate(signal: Int32 = SIGTERM) async -> Int32 {
        kill(pid, signal)
        let status = await withCheckedContinuation { continuation in
            Thread.detachNewThread { [pid] in continuation.resume(returning: Child(pid: pid, stdout: -1, stderr: -1).wait()) }
        }
        exited.withLock { $0 = true }
        return status
    }

    deinit {
        // A test that failed early still must not leave its server behind.
        if !exited.withLock({ $0 }) {
            kill(pid, SIGKILL)
            _ = Child(pid: pid, stdout: -1, stderr: -1).wait()
        }
    }
}
