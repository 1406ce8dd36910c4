import ArgumentParser
import Foundation
import PoolAPI

#if canImport(Glibc)
import Glibc
#endif

/// `--wait` and `--timeout`, shared by the commands that can wait for the
/// outcome of what they asked.
struct WaitOptions: ParsableArguments {
    @Flag(help: "Wait for the outcome, showing the launch phases as they happen.")
    var wait = false

    @Option(help: "With --wait: give up after this many seconds (1 to 86400).")
    var timeout = 600

    func validate() throws {
        guard (1...86_400).contains(timeout) else {
            throw ValidationError("--timeout must be from 1 to 86400 seconds (it was \(timeout)).")
        }
    }
}

/// What `--wait` saw of an instance when it stopped waiting.
struct LaunchOutcome {
    var instance: ServerInstance
    var ssh: SSHEndpoint?
}

extension UserAPIOptions {
    /// Waits until the instance is `ACTIVE` and its SSH server answered its
    /// appliance's probe, printing each launch phase on standard error as it
    /// is recorded. An `ERROR`, `DELETED` or the timeout prints the
    /// instance's last error and console tail and exits 1.
    func waitUntilUp(_ id: String, timeout: Int) async throws -> LaunchOutcome {
        let deadline = ContinuousClock.now + .seconds(timeout)
        var shown = 0
        var cloudInitDone: ContinuousClock.Instant?
        while true {
            let instance = try await one(id)
            let timeline = try await call(.GET, instancePath(id) + "/timeline", as: [ServerTimelineEntry].self)
            for entry in timeline.dropFirst(shown) { progress(entry) }
            shown = max(shown, timeline.count)
            let ssh = sshEndpoint(in: timeline)
            switch instance.status {
            case "ACTIVE" where ssh != nil:
                return LaunchOutcome(instance: instance, ssh: ssh)
            case "ACTIVE" where timeline.contains { $0.phase == LaunchPhase.postCreateDone.rawValue }:
                // Its appliance cannot reach every guest's SSH (no forward,
                // no address): cloud-init's end is then the last word.
                let done = cloudInitDone ?? .now
                cloudInitDone = done
                if ContinuousClock.now - done > .seconds(30) { return LaunchOutcome(instance: instance, ssh: nil) }
            case "ERROR", "DELETED":
                try await failLaunch(instance, "is \(instance.status)")
            default:
                break
            }
            guard ContinuousClock.now < deadline else {
                let last = timeline.last.map { ", last phase \($0.phase)" } ?? ""
                try await failLaunch(instance, "is not up after \(timeout) s (status \(instance.status)\(last))")
            }
            try await Task.sleep(for: .seconds(1))
        }
    }

    /// Waits until the instance is `DELETED`; the timeout exits 1.
    func waitUntilDeleted(_ id: String, timeout: Int) async throws {
        let deadline = ContinuousClock.now + .seconds(timeout)
        while true {
            let instance = try await one(id)
            if instance.status == "DELETED" { return }
            guard ContinuousClock.now < deadline else {
                fail("\(instance.hostname ?? id) is not deleted after \(timeout) s (status \(instance.status)); see `corral agent status` on its appliance")
            }
            try await Task.sleep(for: .seconds(1))
        }
    }

    /// The one instance with this id or hostname.
    func one(_ id: String) async throws -> ServerInstance {
        guard let instance = try await call(.GET, instancePath(id)).first else {
            fail("the pool's reply for \(id) holds no instance")
        }
        return instance
    }

    /// One launch phase as a line on standard error.
    func progress(_ entry: ServerTimelineEntry) {
        let seconds = String(format: "%7.1f s", entry.seconds)
        let detail = entry.detail.map { "  " + neutralised($0) } ?? ""
        FileHandle.standardError.write(Data("  \(seconds)  \(entry.phase)\(detail)\n".utf8))
    }

    /// Prints why a launch failed, its last error and console tail, and exits 1.
    func failLaunch(_ instance: ServerInstance, _ what: String) async throws -> Never {
        var lines = ["\(instance.hostname ?? instance.id) \(what)"]
        if let error = instance.lastError { lines.append("last error: \(neutralised(error))") }
        let console = (try? await call(.GET, instancePath(instance.id) + "/console?lines=20", as: [String].self)) ?? []
        if console.isEmpty {
            lines.append("no console output reported yet; see `corral agent status` and the agent's log on its appliance")
        } else {
            lines.append("console (last \(console.count) lines):")
            lines += console.map { "  | " + neutralised($0) }
        }
        fail(lines.joined(separator: "\n"))
    }
}

/// Where the guest's SSH server answered its appliance: the newest
/// `ssh-reachable` phase's detail.
func sshEndpoint(in timeline: [ServerTimelineEntry]) -> SSHEndpoint? {
    timeline.last { $0.phase == LaunchPhase.sshReachable.rawValue }?.detail.flatMap(SSHEndpoint.init)
}

/// A line from a guest or an appliance made safe to print on a terminal:
/// control characters (escape sequences among them) are shown as `^X` or
/// `<XX>` rather than acted on.
func neutralised(_ text: String) -> String {
    var out = ""
    for scalar in text.unicodeScalars {
        switch scalar.value {
        case 0x09: out.unicodeScalars.append(scalar)
        case 0x00..<0x20: out += "^" + String(UnicodeScalar(UInt8(scalar.value + 0x40)))
        case 0x7F: out += "^?"
        case 0x80..<0xA0: out += String(format: "<%02X>", scalar.value)
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out
}

extension Corral.InstancesCommand {
    struct Console: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the newest lines of an instance's serial console, as its appliance last reported them.")
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        @Option(help: "How many lines (1 to the pool's console_tail_lines).") var lines = 100
        @Flag(name: [.customShort("f"), .long], help: "Keep printing new lines as the appliance reports them (every 2 s), until Ctrl-C.")
        var follow = false

        func run() async throws {
            var shown = try await api.call(.GET, instancePath(id) + "/console?lines=\(lines)", as: [String].self)
            if api.json, !follow { return try printJSON(shown) }
            for line in shown { print(neutralised(line)) }
            while follow {
                try await Task.sleep(for: .seconds(2))
                let now = try await api.call(.GET, instancePath(id) + "/console?lines=\(lines)", as: [String].self)
                for line in Self.newLines(after: shown, in: now) { print(neutralised(line)) }
                fflush(nil)  // all C streams: print goes through stdout
                shown = now
            }
        }

        /// The lines of `now` after what `before` ended with: the longest
        /// end of `before` that `now` starts with is skipped.
        static func newLines(after before: [String], in now: [String]) -> ArraySlice<String> {
            for overlap in stride(from: min(before.count, now.count), to: 0, by: -1)
            where Array(before.suffix(overlap)) == Array(now.prefix(overlap)) {
                return now.dropFirst(overlap)
            }
            return now[...]
        }
    }

    struct SSH: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ssh",
            abstract: "Log into an instance with ssh, where its appliance reached the guest's SSH server.",
            discussion: """
                Runs `ssh -p PORT USER@HOST [COMMAND...]` with the endpoint from the instance's launch timeline \
                (its `ssh-reachable` phase). Host keys are remembered under the instance's hostname, so a \
                loopback port used again by another instance does not clash.
                """)
        @OptionGroup var api: UserAPIOptions
        @Argument(help: "The instance's id or hostname.") var id: String
        @Option(name: [.customShort("l"), .long], help: "The guest user to log in as (default: the image's login user, from the API).")
        var user: String?
        @Option(name: [.customShort("i"), .long], help: "The private key to log in with (default: ssh's own choice).")
        var identity: String?
        @Option(name: [.customShort("o"), .customLong("ssh-option")], help: "An ssh -o option, e.g. BatchMode=yes (repeatable).")
        var sshOptions: [String] = []
        @Argument(parsing: .postTerminator, help: "A command to run instead of a shell (after --).")
        var command: [String] = []

        func run() async throws {
            let instance = try await api.one(id)
            // Where its appliance says to connect; else where it reached the guest.
            var endpoint = instance.ssh.map { SSHEndpoint(host: $0.host, port: $0.port) }
            if endpoint == nil {
                endpoint = sshEndpoint(in: try await api.call(.GET, instancePath(id) + "/timeline", as: [ServerTimelineEntry].self))
            }
            guard let endpoint else {
                fail("\(id)'s SSH server has not answered its appliance yet (status \(instance.status)); `corral instances create --wait` waits for it")
            }
            guard let user = user ?? instance.ssh?.user else {
                fail("\(id)'s image names no login user; give one with --user (e.g. debian)")
            }
            var arguments = ["ssh", "-p", "\(endpoint.port)"]
            if let identity { arguments += ["-i", identity] }
            // ssh takes the first value given for an option: the caller's
            // options come before these defaults.
            for option in sshOptions { arguments += ["-o", option] }
            arguments += ["-o", "HostKeyAlias=\(instance.hostname ?? instance.id)", "-o", "StrictHostKeyChecking=accept-new"]
            arguments += ["\(user)@\(endpoint.host)"]
            arguments += command
            try execute(arguments)
        }
    }
}

/// Replaces this process with `arguments[0]`, found on `PATH`.
func execute(_ arguments: [String]) throws -> Never {
    var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) }
    argv.append(nil)
    execvp(arguments[0], &argv)
    fail("cannot run \(arguments[0]): \(String(cString: strerror(errno)))")
}
