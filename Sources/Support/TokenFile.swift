import Foundation

/// Reads an API token from `path`: the file must exist, hold one non-empty
/// line, and be readable by its owner only. Errors name `field` and say
/// whose token (`holder`) belongs there.
public func readTokenFile(_ path: String, field: String, holder: String) throws -> String {
    let attributes: [FileAttributeKey: Any]
    do {
        attributes = try FileManager.default.attributesOfItem(atPath: path)
    } catch {
        throw ConfigurationError(field: field, reason: "cannot read \(path): write the \(holder)'s token there (mode 0600)")
    }
    if let mode = (attributes[.posixPermissions] as? NSNumber)?.intValue, mode & 0o077 != 0 {
        throw ConfigurationError(
            field: field, reason: "\(path) is readable by others (mode \(String(mode, radix: 8))); run `chmod 600 \(path)`")
    }
    let token = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
    guard !token.isEmpty, !token.contains("\n") else {
        throw ConfigurationError(field: field, reason: "\(path) must hold the \(holder)'s token on one line")
    }
    return token
}
