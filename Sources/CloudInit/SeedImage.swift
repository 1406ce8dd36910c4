import Foundation
import Support

extension Seed {
    /// Writes the seed as a NoCloud `cidata` ISO 9660 image at `path` (with
    /// genisoimage, Debian package `genisoimage`), readable by the
    /// hypervisor. The file appears complete or not at all.
    public func writeImage(to path: String) async throws {
        let fileManager = FileManager.default
        let staging = URL(fileURLWithPath: NSTemporaryDirectory())
            .appendingPathComponent("corral-seed-\(UUID().uuidString)")
        try fileManager.createDirectory(at: staging, withIntermediateDirectories: true)
        defer { try? fileManager.removeItem(at: staging) }
        var names: [String] = []
        for file in try files() {
            try Data(file.contents.utf8).write(to: staging.appendingPathComponent(file.name))
            names.append(staging.appendingPathComponent(file.name).path)
        }
        let partial = path + ".part"
        let result = try await runProgram(
            "genisoimage", ["-quiet", "-output", partial, "-volid", "cidata", "-joliet", "-rock"] + names)
        guard result.status == 0 else {
            try? fileManager.removeItem(atPath: partial)
            throw SeedError("genisoimage failed (\(result.status)): \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        try fileManager.setAttributes([.posixPermissions: 0o644], ofItemAtPath: partial)
        guard rename(partial, path) == 0 else {
            try? fileManager.removeItem(atPath: partial)
            throw SeedError("cannot move the seed into place at \(path): \(String(cString: strerror(errno)))")
        }
    }
}

/// The seed image could not be written.
public struct SeedError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
