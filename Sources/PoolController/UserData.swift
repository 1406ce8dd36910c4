import Foundation
import Yams

/// The checks on a create's `user-data`: what cloud-init would take as one
/// part, within bounds.
enum UserData {
    static let maximumBytes = 64 * 1024

    /// Why `text` is refused, or nil when it is a `#cloud-config` YAML
    /// mapping or a `#!` script of at most 64 KiB.
    /// Whether `text` is a `#!` script (which can run in a guest already
    /// booted) rather than a `#cloud-config` document (read at first boot).
    static func isScript(_ text: String) -> Bool {
        firstLine(text).hasPrefix("#!")
    }

    private static func firstLine(_ text: String) -> String {
        text.prefix { $0 != "\n" && $0 != "\r" }.trimmingCharacters(in: .whitespaces)
    }

    static func problem(_ text: String) -> String? {
        guard text.utf8.count <= maximumBytes else {
            return "is \(text.utf8.count) bytes, more than \(maximumBytes); fetch bigger files from the script instead"
        }
        guard !text.unicodeScalars.contains("\0") else { return "holds a NUL character" }
        let first = firstLine(text)
        if first == "#cloud-config" {
            let node: Node?
            do {
                node = try Yams.compose(yaml: text)
            } catch {
                return "is not valid YAML: \(String(describing: error).prefix(200))"
            }
            guard case .mapping? = node else { return "must be a #cloud-config mapping (keys such as packages:, runcmd:)" }
            return nil
        }
        if first.hasPrefix("#!") { return nil }
        return "must start with '#cloud-config' or '#!' (a script), as cloud-init's user-data does"
    }
}
