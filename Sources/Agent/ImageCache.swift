import AsyncHTTPClient
import Crypto
import Egress
import Foundation
import Logging
import NIOCore
import PoolAPI
import Support

/// An image that could not be made ready; the message says which and why.
public struct ImageError: Error, CustomStringConvertible, Equatable {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// The content-addressed image cache: each file lives once, at
/// `<dir>/sha256/<hex digest>`, whatever URL it came from.
///
/// Every URL, and every redirect, passes the ``EgressGuard`` (public
/// addresses only, unless `[images] allow` names a network). A download goes
/// to a temporary file in the same directory, is hashed as it streams, is
/// cut off at `max_bytes` and at `download_timeout_seconds` (headers and
/// body), is checked (the SHA-256, which is required unless
/// `require_sha256 = false`; a disk image's format by ``ImageGate``), and
/// only then renamed into place. A disk image passes ``ImageGate`` again on
/// every later use, with the format that use declares. Concurrent requests
/// for one URL share one download.
public actor ImageCache {
    public let directory: String
    private let store: AgentStore
    private let metrics: AgentMetrics?
    private let client: HTTPClient
    private let logger: Logger
    private let limits: AgentConfiguration.Images
    private let guardrail: EgressGuard
    private let qemuUser: String
    /// QEMU's group: the cache's directories are 0710 and its files 0640 to it.
    private let qemuGroup: gid_t?
    private var downloads: [String: Task<String, any Error>] = [:]
    /// Redirects followed per download, each through the guard again.
    static let maxRedirects = 5

    public init(
        directory: String, store: AgentStore, limits: AgentConfiguration.Images = .init(), qemuUser: String = "libvirt-qemu",
        qemuGroup: gid_t? = nil, logger: Logger, metrics: AgentMetrics? = nil
    ) throws {
        self.metrics = metrics
        self.directory = directory
        self.qemuGroup = qemuGroup
        self.store = store
        self.logger = logger
        self.limits = limits
        self.qemuUser = qemuUser
        self.guardrail = EgressGuard(
            allow: limits.allow.compactMap(IPNetwork.init), ports: limits.ports, purpose: "image downloads",
            allowSetting: "images.allow in agent.toml", portsSetting: "images.ports")
        self.client = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            configuration: .init(redirectConfiguration: .disallow, timeout: .init(connect: .seconds(15))))
        for sub in ["sha256", "tmp"] {
            try FileManager.default.createDirectory(atPath: "\(directory)/\(sub)", withIntermediateDirectories: true)
        }
        for path in [directory, "\(directory)/sha256", "\(directory)/tmp"] {
            try FileModes.set(path, mode: qemuGroup == nil ? 0o755 : 0o710, group: qemuGroup)
        }
        // Partial downloads of an agent that was killed are never resumed.
        for leftover in (try? FileManager.default.contentsOfDirectory(atPath: "\(directory)/tmp")) ?? [] {
            try? FileManager.default.removeItem(atPath: "\(directory)/tmp/\(leftover)")
        }
    }

    public func shutdown() async {
        for task in downloads.values { task.cancel() }
        try? await client.shutdown()
    }

    /// The cached path of a disk image, fetching it when needed; on every
    /// call, fetched or cached, the file passes ``ImageGate`` as the format
    /// this image declares. Returns the path and the image's virtual size.
    public func image(_ image: ImageReference, forInstance instance: String? = nil) async throws -> (path: String, virtualSize: Int64) {
        let what = "image '\(image.name)'"
        guard ["qcow2", "raw"].contains(image.diskFormat) else {
            throw ImageError("\(what): disk_format must be qcow2 or raw (it is '\(image.diskFormat)')")
        }
        guard image.containerFormat == "bare" else {
            throw ImageError("\(what): container_format must be bare (it is '\(image.containerFormat)')")
        }
        let path = try await file(
            RemoteFile(url: image.url, sha256: image.sha256), format: image.diskFormat, what: what, forInstance: instance)
        let virtualSize = try await ImageGate.admit(path, declared: image.diskFormat, what: what, qemuUser: qemuUser)
        return (path, virtualSize)
    }

    /// The cached path of a file (a kernel, an initrd), fetching it when
    /// needed; a download with a `format` passes ``ImageGate`` before it
    /// enters the cache.
    public func file(_ remote: RemoteFile, format: String? = nil, what: String, forInstance instance: String? = nil) async throws
        -> String
    {
        let path = try await fetchedFile(remote, format: format, what: what)
        // Used now: the file is the most recently used, and the instance's.
        _ = utimes(path, nil)
        if let instance { try await store.recordImageUse(instance: instance, sha256: URL(fileURLWithPath: path).lastPathComponent) }
        return path
    }

    private func fetchedFile(_ remote: RemoteFile, format: String?, what: String) async throws -> String {
        let wanted = remote.sha256?.lowercased()
        if let wanted {
            guard wanted.count == 64, wanted.allSatisfy(\.isHexDigit) else {
                throw ImageError("\(what): sha256 must be 64 hex digits (it is '\(wanted)')")
            }
            let path = cachedPath(wanted)
            if FileManager.default.fileExists(atPath: path) {
                metrics?.cacheHits.increment()
                return path
            }
        } else if limits.requireSHA256 {
            throw ImageError(
                "\(what) has no sha256: this appliance only downloads files with a checksum (give the image one, or set images.require_sha256 = false in agent.toml)")
        } else if let known = try await store.cachedFile(url: remote.url), FileManager.default.fileExists(atPath: cachedPath(known.sha256)) {
            metrics?.cacheHits.increment()
            return cachedPath(known.sha256)
        }
        metrics?.cacheMisses.increment()
        // One download per URL, digest and declared format: a download is
        // checked as the format its requester declared.
        let key = "\(remote.url) \(wanted ?? "") \(format ?? "file")"
        if let running = downloads[key] { return try await running.value }
        let task = Task { try await self.download(remote.url, expecting: wanted, format: format, what: what) }
        downloads[key] = task
        defer { downloads[key] = nil }
        return try await task.value
    }

    private func cachedPath(_ digest: String) -> String { "\(directory)/sha256/\(digest)" }

    private func download(_ url: String, expecting wanted: String?, format: String?, what: String) async throws -> String {
        let started = ContinuousClock.now
        let partial = "\(directory)/tmp/\(UUID().uuidString).part"
        guard FileManager.default.createFile(atPath: partial, contents: nil, attributes: [.posixPermissions: 0o600]),
            (try? FileModes.set(partial, mode: qemuGroup == nil ? 0o644 : 0o640, group: qemuGroup)) != nil,
            let handle = FileHandle(forWritingAtPath: partial)
        else { throw ImageError("\(what): cannot write to the image cache at \(directory)/tmp") }
        var keep = false
        defer {
            try? handle.close()
            if !keep { try? FileManager.default.removeItem(atPath: partial) }
        }
        let seconds = limits.downloadTimeoutSeconds
        let fetched: (digest: String, bytes: Int64)?
        do {
            fetched = try await withDeadline(.seconds(seconds)) { try await self.fetch(url, into: handle, what: what) }
        } catch let error as ImageError {
            throw error
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            throw ImageError("\(what): cannot download \(url): \(error)")
        }
        guard let (digest, bytes) = fetched else {
            throw ImageError("\(what): the download of \(url) did not end within \(seconds) s (images.download_timeout_seconds)")
        }
        if let wanted, digest != wanted {
            throw ImageError("\(what): the file at \(url) has sha256 \(digest), not the expected \(wanted)")
        }
        if let format { _ = try await ImageGate.admit(partial, declared: format, what: what, qemuUser: qemuUser) }
        let path = cachedPath(digest)
        guard rename(partial, path) == 0 else {
            throw ImageError("\(what): cannot move the download into the cache: \(String(cString: strerror(errno)))")
        }
        keep = true
        try await store.recordCachedFile(CachedFile(url: url, sha256: digest, format: format ?? "file", bytes: bytes, fetchedAt: Date()))
        logger.info(
            "cached \(what)",
            metadata: ["url": "\(url)", "sha256": "\(digest)", "bytes": "\(bytes)", "seconds": "\(ContinuousClock.now - started)"])
        await evict()
        return path
    }

    /// Files used (or downloaded) this recently are never evicted: a build
    /// may hold one it has not yet recorded as its own.
    static let evictionGrace: TimeInterval = 600

    /// Removes the least recently used cached files that no instance uses
    /// until the cache is within `cache_max_bytes`.
    func evict() async {
        let cap = limits.cacheMaxBytes
        let folder = "\(directory)/sha256"
        var files: [(name: String, bytes: Int64, used: Date)] = []
        for name in (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? [] {
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: "\(folder)/\(name)"),
                let bytes = (attributes[.size] as? NSNumber)?.int64Value, let used = attributes[.modificationDate] as? Date
            else { continue }
            files.append((name, bytes, used))
        }
        var total = files.reduce(Int64(0)) { $0 &+ $1.bytes }
        guard total > cap else { return }
        // Without knowing what is in use, nothing is removed.
        guard let inUse = try? await store.digestsInUse() else { return }
        let recent = Date().addingTimeInterval(-Self.evictionGrace)
        for file in files.sorted(by: { $0.used < $1.used }) where total > cap && !inUse.contains(file.name) && file.used < recent {
            do {
                try FileManager.default.removeItem(atPath: "\(folder)/\(file.name)")
                total -= file.bytes
                logger.info("evicted \(file.name) from the image cache", metadata: ["bytes": "\(file.bytes)", "cache_bytes": "\(total)"])
            } catch {
                logger.warning("cannot evict \(file.name) from the image cache: \(error)")
            }
        }
        if total > cap {
            logger.warning("the image cache holds \(total) bytes, more than images.cache_max_bytes (\(cap)): the rest is in use or recent")
        }
    }

    /// Streams `url` into `handle`, following at most ``maxRedirects``
    /// redirects, each through the guard; at most `max_bytes`.
    private func fetch(_ url: String, into handle: FileHandle, what: String) async throws -> (digest: String, bytes: Int64) {
        var next = url
        for _ in 0...Self.maxRedirects {
            let request: HTTPClientRequest
            do {
                request = try await guardrail.request(for: next)
            } catch {
                throw ImageError("\(what): \(next) is refused: \(error.reason)")
            }
            let response = try await client.execute(request, timeout: .seconds(Int64(limits.downloadTimeoutSeconds) + 1))
            if [301, 302, 303, 307, 308].contains(response.status.code) {
                guard let location = response.headers.first(name: "Location"),
                    let target = URL(string: location, relativeTo: URL(string: next))?.absoluteString
                else { throw ImageError("\(what): \(next) answered \(response.status.code) without a usable Location") }
                next = target
                continue
            }
            guard response.status == .ok else {
                throw ImageError("\(what): \(next) answered \(response.status.code) \(response.status.reasonPhrase)")
            }
            let cap = limits.maxBytes
            if let declared = response.headers.first(name: "Content-Length").flatMap(Int64.init), declared > cap {
                throw ImageError("\(what): \(next) is \(declared) bytes, more than images.max_bytes (\(cap))")
            }
            var hasher = SHA256()
            var bytes: Int64 = 0
            for try await chunk in response.body {
                bytes += Int64(chunk.readableBytes)
                guard bytes <= cap else {
                    throw ImageError("\(what): \(next) sent more than images.max_bytes (\(cap) bytes); the download was stopped there")
                }
                chunk.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) }
                try handle.write(contentsOf: Data(chunk.readableBytesView))
            }
            try handle.synchronize()
            return (hasher.finalize().map { String(format: "%02x", $0) }.joined(), bytes)
        }
        throw ImageError("\(what): \(url) redirected more than \(Self.maxRedirects) times")
    }
}
