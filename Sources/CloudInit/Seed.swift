import Foundation
import Yams

/// A cloud-init NoCloud seed: the files a guest reads from its `cidata`
/// volume on first boot. Every file is rendered by a pure function; YAML is
/// built as a node tree and serialized by Yams, never pasted together, so
/// no value (an SSH key, a name, a script) can add keys to it.
public struct Seed: Sendable, Equatable {
    /// The instance's unique id (cloud-init runs its first-boot modules
    /// once per id).
    public var instanceID: String
    /// The guest's host name (letters, digits and `-`; at most 63).
    public var hostname: String
    /// The instance's name in the pool, told to the guest.
    public var instanceName: String
    /// The pool's URL, told to the guest.
    public var poolURL: String
    /// SSH public keys for the default user, one per entry.
    public var sshKeys: [String]
    /// The wisp's post-creation text: a `#!` script runs as a script once,
    /// `#cloud-config` is merged under our cloud-config (ours wins), anything
    /// else runs as a `/bin/sh` script.
    public var postCreate: String
    /// The MAC address of the guest's NIC, matched by the network config
    /// (nil: the first interface named `e*`).
    public var macAddress: String?
    /// The instance owner's own part, taken like `postCreate` and run (or
    /// merged) after it.
    public var ownUserData: String

    public init(
        instanceID: String, hostname: String, instanceName: String, poolURL: String, sshKeys: [String] = [],
        postCreate: String = "", macAddress: String? = nil, ownUserData: String = ""
    ) {
        self.ownUserData = ownUserData
        self.instanceID = instanceID
        self.hostname = hostname
        self.instanceName = instanceName
        self.poolURL = poolURL
        self.sshKeys = sshKeys
        self.postCreate = postCreate
        self.macAddress = macAddress
    }

    /// Where the guest finds its instance name and pool URL.
    public static let environmentFile = "/etc/corral/instance.env"

    /// How cloud-init's last line on the console starts (our
    /// `final_message`, printed when its final stage, the post-create part
    /// included, is over); the agent watches for it.
    public static let finishedMarker = "corral: cloud-init finished"

    /// `meta-data`: the instance id and host name.
    public func metaData() throws -> String {
        try yaml([("instance-id", string(instanceID)), ("local-hostname", string(hostname))])
    }

    /// Our cloud-config part: SSH keys for the default user, the host name,
    /// the final console message the agent watches for, and the environment
    /// file naming the instance and the pool.
    public func cloudConfig() throws -> String {
        let environment = [("CORRAL_INSTANCE", instanceName), ("CORRAL_POOL_URL", poolURL)]
            .map { "\($0.0)=\(shellQuoted($0.1))\n" }.joined()
        var entries: [(String, Node)] = [
            ("hostname", string(hostname)),
            ("final_message", string(Self.finishedMarker + " after $UPTIME s of uptime")),
            ("ssh_authorized_keys", Node.sequence(.init(sshKeys.map(string)))),
            (
                "write_files",
                Node.sequence(
                    .init([
                        mapping([
                            ("path", string(Self.environmentFile)),
                            ("owner", string("root:root")),
                            ("permissions", string("0644")),
                            ("content", Node.scalar(.init(environment, Tag(.str), .literal))),
                        ])
                    ]))
            ),
        ]
        if sshKeys.isEmpty { entries.removeAll { $0.0 == "ssh_authorized_keys" } }
        return "#cloud-config\n" + (try yaml(entries))
    }

    /// `network-config` (version 2): DHCPv4 on the guest's NIC.
    public func networkConfig() throws -> String {
        let match: Node =
            if let macAddress { mapping([("macaddress", string(macAddress.lowercased()))]) } else { mapping([("name", string("e*"))]) }
        return try yaml([
            ("version", Node("2", Tag(.int))),
            ("ethernets", mapping([("primary", mapping([("match", match), ("dhcp4", Node("true", Tag(.bool)))]))])),
        ])
    }

    /// The wisp's part: its MIME type and its text as the guest gets it.
    public var postCreatePart: (type: String, text: String)? { Self.part(postCreate) }

    /// The owner's part, likewise.
    public var ownUserDataPart: (type: String, text: String)? { Self.part(ownUserData) }

    static func part(_ text: String) -> (type: String, text: String)? {
        let text = text.replacingOccurrences(of: "\r\n", with: "\n")
        guard !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else { return nil }
        let firstLine = text.prefix { $0 != "\n" }.trimmingCharacters(in: .whitespaces)
        if firstLine == "#cloud-config" { return ("text/cloud-config", text) }
        if firstLine.hasPrefix("#!") { return ("text/x-shellscript", text) }
        return ("text/x-shellscript", "#!/bin/sh\n" + text)
    }

    /// `user-data`: MIME multipart with our cloud-config first, then the
    /// user's part. The user's cloud-config is merged with
    /// `dict(no_replace,recurse_list)+list(append)`, so it can add to ours
    /// but never replace a key we set. The boundary is chosen so that no
    /// part contains it.
    public func userData(boundary proposed: String? = nil) throws -> String {
        var parts = [("text/cloud-config", try cloudConfig(), "cloud-config.yaml")]
        // cloud-init runs scripts in file-name order: post-create before user-data.
        if let user = postCreatePart {
            parts.append((user.type, user.text, user.type == "text/cloud-config" ? "post-create.yaml" : "post-create.sh"))
        }
        if let own = ownUserDataPart {
            parts.append((own.type, own.text, own.type == "text/cloud-config" ? "user-data.yaml" : "user-data.sh"))
        }
        var boundary = proposed ?? "corral-" + UUID().uuidString.lowercased()
        while parts.contains(where: { $0.1.contains(boundary) }) { boundary = "corral-" + UUID().uuidString.lowercased() }
        var text = """
            Content-Type: multipart/mixed; boundary="\(boundary)"
            MIME-Version: 1.0


            """
        for (type, body, filename) in parts {
            text += "--\(boundary)\n"
            text += "Content-Type: \(type); charset=\"utf-8\"\n"
            text += "MIME-Version: 1.0\n"
            text += "Content-Transfer-Encoding: 8bit\n"
            text += "Content-Disposition: attachment; filename=\"\(filename)\"\n"
            if type == "text/cloud-config", filename != "cloud-config.yaml" {
                text += "Merge-Type: dict(no_replace,recurse_list)+list(append)+str()\n"
            }
            text += "\n" + body + (body.hasSuffix("\n") ? "" : "\n")
        }
        return text + "--\(boundary)--\n"
    }

    /// The seed's files by name, as written to the `cidata` volume.
    public func files(boundary: String? = nil) throws -> [(name: String, contents: String)] {
        [
            ("meta-data", try metaData()), ("user-data", try userData(boundary: boundary)),
            ("network-config", try networkConfig()),
        ]
    }
}

private func string(_ value: String) -> Node { .scalar(value.represented()) }

private func mapping(_ pairs: [(String, Node)]) -> Node {
    .mapping(.init(pairs.map { (string($0.0), $0.1) }))
}

private func yaml(_ pairs: [(String, Node)]) throws -> String {
    try Yams.serialize(node: mapping(pairs), width: -1, allowUnicode: true)
}

/// `value` in single quotes for a POSIX shell (and systemd's EnvironmentFile).
func shellQuoted(_ value: String) -> String {
    "'" + value.replacingOccurrences(of: "'", with: "'\\''") + "'"
}
