import AsyncHTTPClient
import Crypto
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
/// A download goes to a temporary file in the same directory, is hashed as
/// it streams, checked (the SHA-256 when the pool gives one; the format
/// with `qemu-img info -f`), and only then renamed into place: a file in the
/// cache is always complete and checked. Concurrent requests for one URL
/// share one download.
public actor ImageCache {
    public let directory: String
    private let store: AgentStore
    private let client: HTTPClient
    private let logger: Logger
    private var downloads: [String: Task<String, any Error>] = [:]

    public init(directory: String, store: AgentStore, logger: Logger) throws {
        self.directory = directory
        self.store = store
        self.logger = logger
        self.client = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            configuration: .init(redirectConfiguration: .follow(max: 5, allowCycles: false), timeout: .init(connect: .seconds(15))))
        for sub in ["sha256", "tmp"] {
            try FileManager.default.createDirectory(
                atPath: "\(directory)/\(sub)", withIntermediateDirectories: true, attributes: [.posixPermissions: 0o755])
        }
        try? FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: directory)
        // Partial downloads of an agent that was killed are never resumed.
        for leftover in (try? FileManager.default.contentsOfDirectory(atPath: "\(directory)/tmp")) ?? [] {
            try? FileManager.default.removeItem(atPath: "\(directory)/tmp/\(leftover)")
        }
    }

    public func shutdown() async {
        for task in downloads.values { task.cancel() }
        try? await client.shutdown()
    }

    /// The cached path of a disk image, fetching it when needed.
    public func image(_ image: ImageReference) async throws -> String {
        guard ["qcow2", "raw"].contains(image.diskFormat) else {
            throw ImageError("image '\(image.name)': disk_format must be qcow2 or raw (it is '\(image.diskFormat)')")
        }
        guard image.containerFormat == "bare" else {
            throw ImageError("image '\(image.name)': container_format must be bare (it is '\(image.containerFormat)')")
        }
        return try await file(RemoteFile(url: image.url, sha256: image.sha256), format: image.diskFormat, what: "image '\(image.name)'")
    }

    /// The cached path of a file (a kernel, an initrd), fetching it when
    /// needed; `format` is checked with qemu-img when given.
    public func file(_ remote: RemoteFile, format: String? = nil, what: String) async throws -> String {
        let wanted = remote.sha256?.lowercased()
        if let wanted {
            guard wanted.count == 64, wanted.allSatisfy(\.isHexDigit) else {
                throw ImageError("\(what): sha256 must be 64 hex digits (it is '\(wanted)')")
            }
            let path = cachedPath(wanted)
            if FileManager.default.fileExists(atPath: path) { return path }
        } else if let known = try await store.cachedFile(url: remote.url), FileManager.default.fileExists(atPath: cachedPath(known.sha256)) {
            return cachedPath(known.sha256)
        }
        let key = "\(remote.url) \(wanted ?? "")"
        if let running = downloads[key] { return try await running.value }
        let task = Task { try await self.download(remote.url, expecting: wanted, format: format, what: what) }
        downloads[key] = task
        defer { downloads[key] = nil }
        return try await task.value
    }

    private func cachedPath(_ digest: String) -> String { "\(directory)/sha256/\(digest)" }

    private func download(_ url: String, expecting wanted: String?, format: String?, what: String) async throws -> String {
        guard let parsed = URL(string: url), ["http", "https"].contains(parsed.scheme?.lowercased()) else {
            throw ImageError("\(what): '\(url)' is not an http or https URL")
        }
        let started = ContinuousClock.now
        let partial = "\(directory)/tmp/\(UUID().uuidString).part"
        guard FileManager.default.createFile(atPath: partial, contents: nil, attributes: [.posixPermissions: 0o644]),
            let handle = FileHandle(forWritingAtPath: partial)
        else { throw ImageError("\(what): cannot write to the image cache at \(directory)/tmp") }
        var keep = false
        defer {
            try? handle.close()
            if !keep { try? FileManager.default.removeItem(atPath: partial) }
        }
        var hasher = SHA256()
        var bytes: Int64 = 0
        do {
            let response = try await client.execute(HTTPClientRequest(url: url), timeout: .hours(2))
            guard response.status == .ok else {
                throw ImageError("\(what): \(url) answered \(response.status.code) \(response.status.reasonPhrase)")
            }
            for try await chunk in response.body {
                chunk.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) }
                try handle.write(contentsOf: Data(chunk.readableBytesView))
                bytes += Int64(chunk.readableBytes)
            }
            try handle.synchronize()
        } catch let error as ImageError {
            throw error
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            throw ImageError("\(what): cannot download \(url): \(error)")
        }
        let digest = hasher.finalize().map { String(format: "%02x", $0) }.joined()
        if let wanted, digest != wanted {
            throw ImageError("\(what): the file at \(url) has sha256 \(digest), not the expected \(wanted)")
        }
        if let format { try await Self.checkFormat(partial, format: format, what: what) }
        let path = cachedPath(digest)
        guard rename(partial, path) == 0 else {
            throw ImageError("\(what): cannot move the download into the cache: \(String(cString: strerror(errno)))")
        }
        keep = true
        try await store.recordCachedFile(CachedFile(url: url, sha256: digest, format: format ?? "file", bytes: bytes, fetchedAt: Date()))
        logger.info(
            "cached \(what)",
            metadata: ["url": "\(url)", "sha256": "\(digest)", "bytes": "\(bytes)", "seconds": "\(ContinuousClock.now - started)"])
        return path
    }

    /// Checks with `qemu-img info -f FORMAT` that the file is that format,
    /// and refuses qcow2 files that point at other files (a backing file
    /// or an external data file would let an image read the host's files).
    static func checkFormat(_ path: String, format: String, what: String) async throws {
        let result = try await runProgram("qemu-img", ["info", "-f", format, "--output=json", path])
        guard result.status == 0 else {
            let reason = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
            throw ImageError("\(what) is not a valid \(format) image: \(reason)")
        }
        guard let info = try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any] else {
            throw ImageError("\(what): qemu-img info gave no readable answer")
        }
        guard info["format"] as? String == format else {
            throw ImageError("\(what) is \(info["format"] ?? "unknown"), not \(format)")
        }
        if let backing = info["backing-filename"] as? String {
            throw ImageError("\(what) is refused: it names a backing file (\(backing)); upload a self-contained image (qemu-img convert)")
        }
        if let specific = info["format-specific"] as? [String: Any], let data = specific["data"] as? [String: Any],
            let dataFile = data["data-file"] as? String
        {
            throw ImageError("\(what) is refused: it names an external data file (\(dataFile)); upload a self-contained image")
        }
    }
}
