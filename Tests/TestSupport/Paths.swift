import Foundation

/// Where things are when tests run from `swift test`.
public enum Paths {
    /// The package's root directory.
    public static let packageRoot: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The `corral` executable built alongside the tests (or `CORRAL_BIN`).
    public static var corralBinary: URL {
        if let path = ProcessInfo.processInfo.environment["CORRAL_BIN"] { return URL(fileURLWithPath: path) }
        return URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            .appendingPathComponent("corral")
    }

    /// A fresh directory that the hypervisor (the libvirt-qemu user) can
    /// read and write, for kernels, disks and console logs of test domains.
    public static func scratchDirectory(_ label: String) throws -> URL {
        let base = URL(fileURLWithPath: "/var/lib/corral/test-scratch")
        let directory = base.appendingPathComponent("\(label)-\(UUID().uuidString.prefix(8).lowercased())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        try FileManager.default.setAttributes([.posixPermissions: 0o777], ofItemAtPath: directory.path)
        return directory
    }
}
