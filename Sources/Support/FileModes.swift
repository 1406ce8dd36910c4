import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// Sets files' modes and groups, for state that must stay private to root
/// and, where QEMU must read it, to QEMU's group.
public enum FileModes {
    /// The id of the group named `name`, or nil when there is none.
    public static func groupID(_ name: String) -> gid_t? {
        guard let entry = getgrnam(name) else { return nil }
        return entry.pointee.gr_gid
    }

    /// Gives `path` `mode` and, when given, `group` (the owner stays).
    public static func set(_ path: String, mode: mode_t, group: gid_t? = nil) throws {
        if let group, chown(path, uid_t.max, group) != 0 {
            throw FileModeError("cannot give \(path) to group \(group): \(String(cString: strerror(errno)))")
        }
        guard chmod(path, mode) == 0 else {
            throw FileModeError("cannot set the mode of \(path) to \(String(mode, radix: 8)): \(String(cString: strerror(errno)))")
        }
    }

    /// The permission bits of `path`, or nil when it cannot be read.
    public static func mode(of path: String) -> mode_t? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return info.st_mode & 0o7777
    }
}

public struct FileModeError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
