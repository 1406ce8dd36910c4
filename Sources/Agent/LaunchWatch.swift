import CloudInit
import Foundation
import Libvirt
import NIOCore
import NIOPosix
import PoolAPI

/// The end of a launch, seen from the host: cloud-init saying on the
/// serial console that it finished (the post-create part included), and
/// the guest's SSH server answering.
extension Agent {
    /// How long after its domain started a launch is watched.
    static let launchWatchSeconds: TimeInterval = 900

    /// Records `post-create-done` and `ssh-reachable` as they happen, until
    /// both are recorded, the instance stops booting or running, or the
    /// watch window ends. Each new phase is reported to the pool.
    func watchLaunch(_ name: String) async {
        // Only this task records these two phases, so it reads them once.
        guard let timeline = try? await store.timeline(of: name),
            let started = timeline.first(where: { $0.phase == .domainStarted })?.date
        else { return }
        var phases = Set(timeline.map(\.phase))
        var console = ConsoleScanner()
        while !Task.isCancelled, Date().timeIntervalSince(started) < Self.launchWatchSeconds {
            guard let instance = try? await store.instance(named: name), [.booting, .active].contains(instance.phase)
            else { return }
            let target = phases.contains(.sshReachable) ? nil : await sshTarget(of: instance)
            if !phases.contains(.postCreateDone), let path = try? paths.console(name), let finished = console.scan(path) {
                try? await store.record(.postCreateDone, of: name, at: Date(), detail: finished.detail, replacing: false)
                phases.insert(.postCreateDone)
                logger.info("\(name): cloud-init finished (\(finished.detail))", metadata: ["instance": "\(name)"])
                reconcileWakeup.signal()
            }
            if let target, await sshGreets(host: target.host, port: target.port, timeout: .seconds(1)) {
                let endpoint = SSHEndpoint(host: target.host, port: target.port)
                try? await store.record(.sshReachable, of: name, at: Date(), detail: endpoint.detail, replacing: false)
                phases.insert(.sshReachable)
                logger.info("\(name): SSH answers at \(endpoint.detail)", metadata: ["instance": "\(name)"])
                reconcileWakeup.signal()
            }
            if phases.isSuperset(of: [.postCreateDone, .sshReachable]) { return }
            // SSH cannot be reached from here (user-mode networking without
            // a forward): the console alone ends the watch.
            if phases.contains(.postCreateDone), target == nil { return }
            try? await Task.sleep(for: .milliseconds(250))
        }
    }

    /// Where the guest's SSH server is reached from the host: the loopback
    /// forward of user-mode networking, else the guest's first address.
    func sshTarget(of instance: LocalInstance) async -> (host: String, port: Int)? {
        if let port = instance.sshPort { return ("127.0.0.1", port) }
        if case .user = configuration.network { return nil }
        guard let domain = try? await domain(of: instance),
            let addresses = try? await domain.interfaceAddresses().flatMap(\.addresses)
        else { return nil }
        guard let address = addresses.first(where: { $0.family == .ipv4 }) ?? addresses.first else { return nil }
        return (address.address, 22)
    }
}

/// Whether an SSH server answers at `host`:`port`: connects and reads its
/// greeting, which starts with `SSH-` (a port that accepts and closes, as
/// a user-mode forward does before the guest listens, is no answer).
func sshGreets(host: String, port: Int, timeout: Duration) async -> Bool {
    let milliseconds = Int64(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
    do {
        return try await withThrowingTaskGroup(of: Bool.self) { group in
            group.addTask {
                let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                    .connectTimeout(.milliseconds(milliseconds))
                    .connect(host: host, port: port) { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                        }
                    }
                return try await channel.executeThenClose { inbound, _ in
                    var greeting = ByteBuffer()
                    for try await var chunk in inbound {
                        greeting.writeBuffer(&chunk)
                        if greeting.readableBytes >= 4 { break }
                    }
                    return greeting.readableBytesView.starts(with: Array("SSH-".utf8))
                }
            }
            group.addTask {
                try await Task.sleep(for: timeout)
                return false
            }
            let answer = try await group.next() ?? false
            group.cancelAll()
            return answer
        }
    } catch {
        return false
    }
}

/// Reads a serial console log as it grows, looking for the line cloud-init
/// prints when it has finished (our seed's `final_message`), and for a
/// failed post-create script before it.
struct ConsoleScanner {
    private var offset: UInt64 = 0
    /// The start of a line whose end has not been read yet.
    private(set) var partial: [UInt8] = []
    private var scriptFailed = false

    /// What the finished line and the lines before it said.
    struct Finished: Equatable {
        /// The guest's uptime when cloud-init finished, in seconds.
        var uptime: String?
        var scriptFailed: Bool

        var detail: String {
            var parts: [String] = []
            if scriptFailed { parts.append("the post-create script failed (its output is on the console)") }
            if let uptime { parts.append("guest uptime \(uptime) s") }
            return parts.joined(separator: "; ")
        }
    }

    /// The most read per scan, and the longest line kept: a guest that
    /// floods its console costs the agent a bounded window, never memory
    /// in proportion to what it wrote.
    static let readLimit = 1 << 20
    static let lineLimit = 4096

    /// Reads what was added to the file since the last call (at most
    /// ``readLimit``); the finished line, once it appears. A file shorter
    /// than what was read (virtlogd rotated it) is read from its start.
    mutating func scan(_ path: String) -> Finished? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        if let size = try? handle.seekToEnd(), size < offset {
            offset = 0
            partial = []
        }
        guard (try? handle.seek(toOffset: offset)) != nil, let data = try? handle.read(upToCount: Self.readLimit), !data.isEmpty
        else { return nil }
        offset += UInt64(data.count)
        return feed(data)
    }

    /// Takes more console output; the finished line, once it appears.
    /// Lines end at `\n` (a serial console sends `\r\n`; as Swift sees
    /// `\r\n` as one character, the split is made on bytes).
    mutating func feed<Bytes: Sequence<UInt8>>(_ bytes: Bytes) -> Finished? {
        var lines = (partial + bytes).split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
        // A line longer than the limit keeps only its start.
        partial = Array(lines.removeLast().prefix(Self.lineLimit))
        lines = lines.map { $0.prefix(Self.lineLimit) }
        for bytes in lines {
            let line = String(decoding: bytes, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines.union(.controlCharacters))
            let lowered = line.lowercased()
            if (lowered.contains("scripts-user") || lowered.contains("scripts_user")) && lowered.contains("fail") {
                scriptFailed = true
            }
            if let range = line.range(of: Seed.finishedMarker) {
                let uptime = line[range.upperBound...].split(separator: " ").first { Double($0) != nil }.map(String.init)
                return Finished(uptime: uptime, scriptFailed: scriptFailed)
            }
        }
        return nil
    }
}
